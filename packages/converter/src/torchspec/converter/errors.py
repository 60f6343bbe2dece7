from torchspec.draft_models.errors import UserInputError

__all__ = ["ConverterError"]


class ConverterError(UserInputError):
    """A user mistake the converter reports as one ``error: ...`` line (exit 2, no traceback)."""
