"""What goes into the wheel (the rest of the metadata is in pyproject.toml).

Every package under ``gateway/``, ``drivers/`` and ``simulators/`` is found, so a new subpackage
cannot be left out of the wheel again. The example configuration stays in the top-level
``config/`` directory (the layout users and the docs know) and ships as the package data of
``gateway.shipped_config`` — never as a top-level package named ``config``.
"""

from setuptools import find_packages, setup

SHIPPED_CONFIG = "gateway.shipped_config"

setup(
    packages=[*find_packages(include=["gateway", "gateway.*", "drivers", "drivers.*", "simulators", "simulators.*"]),
              SHIPPED_CONFIG],
    package_dir={SHIPPED_CONFIG: "config"},
    package_data={"gateway": ["py.typed"], SHIPPED_CONFIG: ["*.yaml", "**/*.yaml", "schemas/*.json"]},
)
