"""Export TorchSpec checkpoints to serving-ready EAGLE-3 draft folders, with vocabulary pruning."""

from torchspec.converter.__about__ import __version__
from torchspec.converter.errors import ConverterError
from torchspec.converter.export import ExportResult, export_checkpoint
from torchspec.draft_models.checkpoint_layout import TrainingCheckpoint, resolve_checkpoint
from torchspec.draft_models.serving_folder import Finding, check_serving_folder

__all__ = [
    "ConverterError",
    "ExportResult",
    "Finding",
    "TrainingCheckpoint",
    "__version__",
    "check_serving_folder",
    "export_checkpoint",
    "resolve_checkpoint",
]
