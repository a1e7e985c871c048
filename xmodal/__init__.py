"""xmodal: cross-modal mechanistic interpretability of vision-language models."""

__version__ = "0.1.0"
