"""The one exception type for mistakes in user data or configuration."""

from torchspec.draft_models.errors import UserInputError

__all__ = ["DataError"]


class DataError(UserInputError):
    """Bad input the user can fix: the message is one line naming the file/line/key and the fix.

    Every command prints the message alone (``error: ...``, exit 2), so messages must be self-contained.
    """
