"""Export TorchSpec checkpoints to serving-ready EAGLE-3 draft folders, with vocabulary pruning."""

from torchspec.converter.__about__ import __version__

__all__ = ["__version__"]
