"""kedit: locate-then-edit knowledge editing for causal language models."""

__version__ = "0.1.0"
