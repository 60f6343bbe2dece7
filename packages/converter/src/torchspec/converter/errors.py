__all__ = ["ConverterError"]


class ConverterError(ValueError):
    """A user mistake the converter reports as one line (the CLI exits non-zero, no traceback)."""
