"""The ``sluice`` command: :mod:`gateway.cli.commands` (the parser, ``main`` and the core commands),
and one module per family of commands — ``demo``, ``init`` (:mod:`gateway.cli.examples`), ``read`` and
``scan`` (:mod:`gateway.cli.commission`), ``lot`` and ``trace`` (:mod:`gateway.cli.trace`), ``ingest``
(:mod:`gateway.cli.ingest`). Empty on purpose: a module of this package imports only what its command needs.
"""
