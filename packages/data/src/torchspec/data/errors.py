"""The one exception type for mistakes in user data or configuration."""

__all__ = ["DataError"]


class DataError(ValueError):
    """Bad input the user can fix: the message is one line naming the file/line/key and the fix.

    The trainer CLI catches it and prints the message alone, so messages must be self-contained.
    """
