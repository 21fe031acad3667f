"""kedit's version: the single source for the package metadata (pyproject), ``kedit.__version__`` and
``kedit --version``. Importing it imports nothing else (no torch)."""

__version__ = "0.1.0"
