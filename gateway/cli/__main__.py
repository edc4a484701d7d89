"""``python -m gateway.cli ARGS``: the same as ``sluice ARGS``."""

import sys

from gateway.cli.commands import main

sys.exit(main())
