"""The package version, in one place (read by ``pyproject.toml`` and ``lightning_diag.__version__``).

Between releases it is the next release's version with ``.dev0``: the CHANGELOG's ``## [Unreleased]`` section
becomes ``0.2.0``. The release step: rename that heading to ``## [0.2.0] - <date>`` (a new, empty
``## [Unreleased]`` above it), drop ``.dev0`` here, run ``.ci/run``, then tag and upload the ``dist/`` files that
``.ci/package`` built and checked.
"""

__version__ = "0.2.0.dev0"
