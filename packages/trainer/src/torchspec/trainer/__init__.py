"""Online EAGLE-3 draft training against a live target model with FSDP2."""

from torchspec.trainer.__about__ import __version__

__all__ = ["__version__"]
