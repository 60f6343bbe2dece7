"""Chat-template tokenization with assistant-only loss masks, datasets and vocab mapping for EAGLE-3 drafts."""

from torchspec.data.__about__ import __version__

__all__ = ["__version__"]
