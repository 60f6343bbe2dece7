"""The error base class of every torchspec package and the exit-code policy of every command.

A ``TorchSpecError`` is a failure the user can act on: its message is one self-contained line naming
the file, key or option and the fix. Every command line (``torchspec-trainer train|evaluate|verify``,
``torchspec-converter export|check``) runs its ``main`` through :func:`cli_main`, which prints such an
error as one ``error: ...`` line on stderr and exits :data:`EXIT_USER_ERROR`. Anything else is a bug
and keeps its traceback.

Exit codes of every command:

====  =====================================================================================
0     success
1     the command ran and its verdict is negative (``check`` found errors, ``evaluate`` or
      ``verify`` saw output that differs from the target's); also Python's code for a bug
      (an uncaught exception, printed with its traceback)
2     a user error: a ``TorchSpecError`` (one ``error: ...`` line) or a command-line syntax
      error (argparse's own code)
130   interrupted (Ctrl-C)
====  =====================================================================================
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable, overload

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_USER_ERROR",
    "TorchSpecError",
    "UserInputError",
    "cli_main",
    "error_line",
]

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class TorchSpecError(Exception):
    """Base of every torchspec error: a failure whose one-line message says what to change."""


class UserInputError(TorchSpecError, ValueError):
    """A bad value, file or option the user passed (a ``ValueError`` too, as it always was)."""


def error_line(err: BaseException) -> str:
    """The message on one line, with a ``[rank N]`` prefix on the non-main ranks of a distributed run."""
    message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
    return f"{prefix}error: {message}"


@overload
def cli_main(main: Callable[..., int], *, interrupted: str = ...) -> Callable[..., int]: ...


@overload
def cli_main(main: None = None, *, interrupted: str = ...) -> Callable[[Callable[..., int]], Callable[..., int]]: ...


def cli_main(
    main: Callable[..., int] | None = None, *, interrupted: str = "interrupted"
) -> Callable[..., int] | Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorate a command's ``main(argv=None) -> int`` with the exit-code policy above.

    ``@cli_main`` or ``@cli_main(interrupted="...")`` (the line printed on Ctrl-C)."""

    def decorate(function: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(function)
        def run(*args, **kwargs) -> int:
            try:
                return function(*args, **kwargs)
            except TorchSpecError as err:
                print(error_line(err), file=sys.stderr)
                return EXIT_USER_ERROR
            except KeyboardInterrupt:
                print(interrupted, file=sys.stderr)
                return EXIT_INTERRUPTED

        return run

    return decorate if main is None else decorate(main)
