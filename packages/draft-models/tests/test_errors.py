"""The error base class every package derives from, and the exit-code policy of every command."""

from __future__ import annotations

import pytest

from torchspec.draft_models import (
    CheckpointNotFoundError,
    DamagedCheckpointError,
    DraftCheckpointError,
    DraftConfigError,
    UnsafeCheckpointError,
)
from torchspec.draft_models.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, TorchSpecError, UserInputError, cli_main


@pytest.mark.parametrize(
    "error",
    [CheckpointNotFoundError, DamagedCheckpointError, DraftCheckpointError, DraftConfigError, UnsafeCheckpointError],
)
def test_draft_models_errors_are_torchspec_errors_and_value_errors(error):
    assert issubclass(error, UserInputError) and issubclass(error, TorchSpecError)
    assert issubclass(error, ValueError)  # callers that caught ValueError keep working


def _command(raise_this: BaseException | None):
    @cli_main(interrupted="interrupted; run it again")
    def main(argv=None) -> int:
        if raise_this is not None:
            raise raise_this
        return 0 if argv is None else len(argv)

    return main


def test_a_user_error_is_one_line_on_stderr_and_exit_2(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    code = _command(DraftConfigError("config.json: hidden_size must be > 0\n  set it to the target's"))()
    out, err = capsys.readouterr()
    assert code == EXIT_USER_ERROR == 2 and out == ""
    assert err == "error: config.json: hidden_size must be > 0 set it to the target's\n"


def test_other_ranks_name_themselves(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    assert _command(TorchSpecError("no space left"))() == 2
    assert capsys.readouterr().err == "[rank 3] error: no space left\n"


def test_a_bug_keeps_its_traceback():
    with pytest.raises(ZeroDivisionError):
        _command(ZeroDivisionError("division by zero"))()
    with pytest.raises(ValueError):  # a plain ValueError is not a user error
        _command(ValueError("shapes do not match"))()


def test_interrupt_and_success(capsys):
    assert _command(KeyboardInterrupt())() == EXIT_INTERRUPTED == 130
    assert capsys.readouterr().err == "interrupted; run it again\n"
    assert _command(None)(["a", "b"]) == 2  # the wrapped main's own return value passes through
    assert _command(None).__name__ == "main"
