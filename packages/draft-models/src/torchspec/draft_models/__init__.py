"""EAGLE-3 draft models (Llama-style and DeepSeek MLA) with test-time training."""

from torchspec.draft_models.__about__ import __version__

__all__ = ["__version__"]
