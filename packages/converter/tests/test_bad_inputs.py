"""Bad inputs to `converter export` and `converter check`, one row a case, through the CLI.

The standard: a user mistake (or a destination that cannot take the export) gives exactly one
``error: ...`` line naming the file or folder and the fix, a non-zero exit, no traceback, and
nothing written: no file or folder under the test's folder changes (no output folder, no staging
folder beside it, an existing export untouched). ``check`` is a report: its error is one finding
line on stdout. Add a row here with every new option.
"""

from __future__ import annotations

import errno
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

import torchspec.converter.export as export_module
import torchspec.converter.safetensors_stream as stream_module
from torchspec.converter.cli import main

from converter_helpers import tiny_draft, write_training_checkpoint
from crafted_checkpoints import FullDiskFile


@dataclass
class Env:
    root: Path  # the test's folder
    checkpoint: Path  # a genuine iter_0000010 in root/run
    served: Path  # its export, root/served
    monkeypatch: pytest.MonkeyPatch


@dataclass
class Case:
    id: str
    # Prepares the case; returns the CLI arguments.
    make: Callable[[Env], list[str]]
    code: int
    words: list[str]  # "{root}" stands for the test's folder
    stream: str = "err"  # check reports on stdout


@pytest.fixture
def env(tmp_path, monkeypatch):
    checkpoint = write_training_checkpoint(tiny_draft("llama"), tmp_path / "run")
    assert main(["export", "--input", str(checkpoint), "--output", str(tmp_path / "served")]) == 0
    return Env(tmp_path, checkpoint, tmp_path / "served", monkeypatch)


def _export(env: Env, *extra: str, source: Path | None = None, output: Path | None = None) -> list[str]:
    return ["export", "--input", str(source or env.checkpoint), "--output", str(output or env.root / "out"), *extra]


def _cut(file: Path, keep: int) -> None:
    file.write_bytes(file.read_bytes()[:keep])


def _truncated_distcp(env: Env):
    _cut(next(env.checkpoint.glob("*.distcp")), 20000)
    return _export(env)


def _truncated_metadata(env: Env):
    _cut(env.checkpoint / ".metadata", 300)
    return _export(env)


def _incomplete(env: Env):
    (env.checkpoint / "COMPLETE").unlink()
    return _export(env)


def _no_checkpoint(env: Env):
    (env.root / "target").mkdir()
    (env.root / "target" / "config.json").write_text("{}")
    return _export(env, source=env.root / "target")


def _aux_layers_out_of_order(env: Env):
    (env.checkpoint / "aux_layers.json").write_text(json.dumps({"aux_layer_ids": [5, 3, 2], "num_target_layers": 6}))
    return _export(env)


def _aux_layers_unknown(env: Env):
    (env.checkpoint / "aux_layers.json").unlink()  # a checkpoint copied without it
    return _export(env)


def _with_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def _parent_is_a_file(env: Env):
    (env.root / "exports").write_text("a file where the export's parent folder should be\n")
    return _export(env, output=env.root / "exports" / "draft")


def _read_only(env: Env):
    def refuse(*args, **kwargs):  # what mkdir/mkdtemp meet on a read-only mount (chmod does not stop root)
        raise OSError(errno.EROFS, "Read-only file system", kwargs.get("dir"))

    env.monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    return _export(env)


def _open_on_a_full_disk(path, mode="r", *args, **kwargs):
    return FullDiskFile(open(path, mode, *args, **kwargs))


def _disk_full(env: Env, *extra: str, output: Path | None = None):
    # The streaming writer opens model.safetensors with the open() of its module.
    env.monkeypatch.setattr(stream_module, "open", _open_on_a_full_disk, raising=False)
    return _export(env, *extra, output=output)


def _check(env: Env, change: Callable[[Path], None]):
    change(env.served)
    return ["check", str(env.served)]


CASES = [
    Case(
        "input-missing",
        lambda env: _export(env, source=env.root / "nope"),
        2,
        ["checkpoint {root}/nope does not exist", "iter_XXXXXXX folder or a training output_dir"],
    ),
    Case("input-without-checkpoint", _no_checkpoint, 2, ["{root}/target holds no complete checkpoint"]),
    Case("input-incomplete", _incomplete, 2, ["{root}/run/iter_0000010 is incomplete", "not fully written"]),
    Case(
        "input-distcp-truncated",
        _truncated_distcp,
        2,
        ["{root}/run/iter_0000010/__0_0.distcp is damaged or truncated", "20000 bytes", "save it again"],
    ),
    Case(
        "input-metadata-truncated",
        _truncated_metadata,
        2,
        ["{root}/run/iter_0000010/.metadata is damaged or truncated"],
    ),
    Case(
        "input-aux-layers-out-of-order",
        _aux_layers_out_of_order,
        2,
        [
            "{root}/run/iter_0000010/aux_layers.json aux_layer_ids must be strictly ascending, got [5, 3, 2]",
            "[2, 3, 5]",
        ],
    ),
    Case(
        "input-aux-layers-unknown",
        _aux_layers_unknown,
        2,
        ["{root}/run/iter_0000010 records no aux layer ids (no aux_layers.json)", "--target-model-path"],
    ),
    Case(
        "output-exists", lambda env: _export(env, output=env.served), 2, ["{root}/served already exists; pass --force"]
    ),
    Case(
        "output-parent-is-a-file",
        _parent_is_a_file,
        2,
        ["cannot write the export {root}/exports/draft", "{root}/exports is a file, not a folder", "--output"],
    ),
    Case(
        "output-read-only",
        _read_only,
        2,
        ["cannot write the export {root}/out (Read-only file system)", "choose a folder this user can write"],
    ),
    Case(
        "output-disk-full",
        _disk_full,
        2,
        [
            "cannot write the export {root}/out (No space left on device)",
            "nothing was left in {root}",
            "free space there",
        ],
    ),
    Case(
        "output-disk-full-replacing",
        lambda env: _disk_full(env, "--force", output=env.served),
        2,
        ["cannot write the export {root}/served (No space left on device)"],
    ),
    Case(
        "target-without-config",
        lambda env: _export(env, "--target-model-path", str(env.root)),
        2,
        ["--target-model-path {root}: no config.json there"],
    ),
    Case(
        "prune-without-size", lambda env: _export(env, "--prune-vocab"), 2, ["--prune-vocab needs --draft-vocab-size N"]
    ),
    Case(
        "size-without-prune",
        lambda env: _export(env, "--draft-vocab-size", "50"),
        2,
        ["--draft-vocab-size only applies with --prune-vocab"],
    ),
    Case(
        "size-out-of-range",
        lambda env: _export(env, "--prune-vocab", "--draft-vocab-size", "500"),
        2,
        ["--draft-vocab-size 500 must be in [1, 120]"],
    ),
    Case(
        "analyze-without-data",
        lambda env: _export(env, "--analyze-vocab"),
        2,
        ["--analyze-vocab needs --dataset-path, --tokenizer, --chat-template"],
    ),
    Case(
        "check-weights-truncated",
        lambda env: _check(env, lambda f: _cut(f / "model.safetensors", 5000)),
        1,
        ["{root}/served/model.safetensors is damaged or truncated"],
        stream="out",
    ),
    Case(
        "check-weights-missing",
        lambda env: _check(env, lambda f: (f / "model.safetensors").unlink()),
        1,
        ["{root}/served/model.safetensors is missing"],
        stream="out",
    ),
    Case(
        "check-config-invalid",
        lambda env: _check(env, lambda f: (f / "config.json").write_text("{\n")),
        1,
        ["{root}/served/config.json:2: invalid JSON"],
        stream="out",
    ),
    Case(
        "check-aux-layers-out-of-order",
        lambda env: _check(env, lambda f: _with_config(f, eagle_aux_hidden_state_layer_ids=[5, 3, 2])),
        1,
        ["eagle_aux_hidden_state_layer_ids must be strictly ascending, got [5, 3, 2]", "[2, 3, 5]"],
        stream="out",
    ),
    Case(
        "check-config-missing",
        lambda env: _check(env, lambda f: (f / "config.json").unlink()),
        1,
        ["{root}/served/config.json is missing"],
        stream="out",
    ),
]


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file and folder under the test's folder (the checkpoint, the exports, staging folders)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_one_line_and_writes_nothing(case, env, capsys):
    args = case.make(env)
    before = _snapshot(env.root)
    capsys.readouterr()
    code = main(args)
    out, err = capsys.readouterr()
    text = err if case.stream == "err" else out
    assert code == case.code, (out, err)
    assert "Traceback" not in out + err
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, text
    if case.stream == "err":
        assert [line for line in err.splitlines() if line.strip()] == errors, err
    else:
        assert not err.strip(), err
    for words in case.words:
        assert words.replace("{root}", str(env.root)) in errors[0], errors[0]
    env.monkeypatch.undo()  # the injected failures end with the command
    assert _snapshot(env.root) == before, "the command wrote or removed something"


def test_a_full_disk_keeps_the_previous_export_servable(env, capsys, monkeypatch):
    """After a failed --force export the previous folder is still the complete, checkable export."""
    config_before = json.loads((env.served / "config.json").read_text())
    monkeypatch.setattr(stream_module, "open", _open_on_a_full_disk, raising=False)
    assert main(["export", "--input", str(env.checkpoint), "--output", str(env.served), "--force"]) == 2
    monkeypatch.undo()
    assert main(["check", str(env.served)]) == 0
    assert json.loads((env.served / "config.json").read_text()) == config_before
    assert sorted(p.name for p in env.root.iterdir()) == ["run", "served"]


def test_a_failed_rename_puts_the_previous_export_back(env, monkeypatch):
    """The last step of a --force export swaps the folders in one rename where the kernel can
    (renameat2), else moves the old folder aside and the new one in; if that second move fails, the
    old folder returns (it used to stay hidden as .NAME.old-PID, which the next export deleted)."""
    import os

    import torchspec.draft_models.atomic as atomic

    before = (env.served / "model.safetensors").read_bytes()
    real_replace = os.replace

    def failing_replace(source, destination):
        if Path(source).name.startswith(".served.tmp-"):
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(source, destination)

    monkeypatch.setattr(os, "replace", failing_replace)
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)  # the path without an atomic swap
    with pytest.raises(export_module.ConverterError, match="cannot write the export .*served"):
        export_module.export_checkpoint(env.checkpoint, env.served, force=True)
    monkeypatch.undo()
    assert (env.served / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in env.root.iterdir()) == ["run", "served"]


def test_converter_error_is_a_torchspec_error():
    from torchspec.converter import ConverterError
    from torchspec.draft_models.errors import TorchSpecError, UserInputError

    assert issubclass(ConverterError, UserInputError) and issubclass(ConverterError, TorchSpecError)
    assert issubclass(ConverterError, ValueError)


def test_a_bug_in_a_command_keeps_its_traceback(env, monkeypatch):
    """Only torchspec's errors become one line (exit 2); anything else is a bug and is raised."""

    def broken(*args, **kwargs):
        raise ValueError("not a user mistake")

    monkeypatch.setattr(export_module, "export_checkpoint", broken)
    with pytest.raises(ValueError, match="not a user mistake"):
        main(["export", "--input", str(env.checkpoint), "--output", str(env.root / "out")])
