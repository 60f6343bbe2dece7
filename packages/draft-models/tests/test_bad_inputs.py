"""Bad inputs to the draft-models loaders, one row a case: a draft config, a serving folder or a DCP
checkpoint the user points at that cannot be used is one ``ValueError`` line (the CLIs print it as
``error: ...``) of the expected class, naming the file and the fix; loading writes nothing.

Add a row here with every new file the package reads.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.distributed.checkpoint as dcp

from torchspec.draft_models import (
    AutoDraftModelConfig,
    AutoEagle3DraftModel,
    DamagedCheckpointError,
    DraftCheckpointError,
    DraftConfigError,
    UnsafeCheckpointError,
    load_dcp,
)

from crafted_checkpoints import CodeRunningPayload, rewrite_dcp_metadata
from draft_helpers import build_draft


@dataclass
class Case:
    id: str
    # Prepares the bad input under the folder; returns the load to attempt and the file it must name.
    make: Callable[[Path], tuple[Callable[[], object], Path]]
    error: type[ValueError]
    words: list[str]


def _draft_folder(folder: Path) -> Path:
    return build_draft("llama").save_pretrained(folder / "draft")


def _dcp_folder(folder: Path) -> Path:
    path = folder / "ckpt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": {"w": torch.arange(600.0).reshape(20, 30)}, "step": 3}, checkpoint_id=str(path))
    return path


def _load_draft(folder: Path):
    return lambda: AutoEagle3DraftModel.from_pretrained(folder)


def _load_dcp(path: Path):
    def load():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_dcp({"model": {"w": torch.zeros(20, 30)}, "step": 0}, path)

    return load


def _config_file(text: str):
    def make(folder: Path):
        (folder / "config.json").write_text(text)
        return (lambda: AutoDraftModelConfig.from_file(folder / "config.json")), folder / "config.json"

    return make


def _truncated_weights(folder: Path):
    draft = _draft_folder(folder)
    weights = draft / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return _load_draft(draft), weights


def _weights_not_safetensors(folder: Path):
    draft = _draft_folder(folder)
    (draft / "model.safetensors").write_text("<html>404 Not Found</html>")
    return _load_draft(draft), draft / "model.safetensors"


def _weights_missing(folder: Path):
    draft = _draft_folder(folder)
    (draft / "model.safetensors").unlink()
    return _load_draft(draft), draft / "model.safetensors"


def _weights_of_another_config(folder: Path):
    draft = _draft_folder(folder)
    config = json.loads((draft / "config.json").read_text())
    (draft / "config.json").write_text(json.dumps({**config, "intermediate_size": config["intermediate_size"] * 2}))
    return _load_draft(draft), draft / "model.safetensors"


def _aux_ids_out_of_order(folder: Path):
    draft = _draft_folder(folder)
    config = json.loads((draft / "config.json").read_text())
    (draft / "config.json").write_text(json.dumps({**config, "eagle_aux_hidden_state_layer_ids": [6, 3, 1]}))
    return (lambda: AutoDraftModelConfig.from_file(draft / "config.json")), draft / "config.json"


def _truncated_distcp(folder: Path):
    path = _dcp_folder(folder)
    data = next(path.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:-100])
    return _load_dcp(path), data


def _missing_distcp(folder: Path):
    path = _dcp_folder(folder)
    data = next(path.glob("*.distcp"))
    data.unlink()
    return _load_dcp(path), data


def _truncated_metadata(folder: Path):
    path = _dcp_folder(folder)
    metadata = path / ".metadata"
    metadata.write_bytes(metadata.read_bytes()[:200])
    return _load_dcp(path), metadata


def _crafted_metadata(folder: Path):
    path = _dcp_folder(folder)
    rewrite_dcp_metadata(path, lambda m: setattr(m, "planner_data", CodeRunningPayload(folder / "MARKER")))
    return _load_dcp(path), path / ".metadata"


CASES = [
    Case(
        "config-missing",
        lambda folder: ((lambda: AutoDraftModelConfig.from_file(folder / "config.json")), folder / "config.json"),
        DraftConfigError,
        ["does not exist"],
    ),
    Case("config-invalid-json", _config_file('{"hidden_size": 64,\n}'), DraftConfigError, [":2: invalid JSON"]),
    Case("config-not-an-object", _config_file("[1, 2]"), DraftConfigError, ["expected a JSON object"]),
    Case(
        "config-unknown-architecture",
        _config_file(json.dumps({"architectures": ["GPT2Eagle3"]})),
        DraftConfigError,
        ["unknown draft architecture 'GPT2Eagle3'", "supported: LlamaForCausalLMEagle3"],
    ),
    Case(
        "config-aux-ids-out-of-order",
        _aux_ids_out_of_order,
        DraftConfigError,
        ["eagle_aux_hidden_state_layer_ids must be strictly ascending, got [6, 3, 1]", "ascending order: [1, 3, 6]"],
    ),
    Case(
        "weights-missing",
        _weights_missing,
        DraftCheckpointError,
        ["does not exist", "needs config.json and model.safetensors"],
    ),
    Case("weights-truncated", _truncated_weights, DamagedCheckpointError, ["is damaged or truncated", "save it again"]),
    Case(
        "weights-not-safetensors", _weights_not_safetensors, DamagedCheckpointError, ["not a readable safetensors file"]
    ),
    Case(
        "weights-of-another-config",
        _weights_of_another_config,
        DraftCheckpointError,
        ["has shape", "config.json implies"],
    ),
    Case(
        "dcp-data-truncated",
        _truncated_distcp,
        DamagedCheckpointError,
        ["is damaged or truncated", "but .metadata places data up to byte"],
    ),
    Case("dcp-data-missing", _missing_distcp, DamagedCheckpointError, ["the file is missing"]),
    Case(
        "dcp-metadata-truncated",
        _truncated_metadata,
        DamagedCheckpointError,
        ["is damaged or truncated (not readable as DCP metadata"],
    ),
    Case("dcp-metadata-crafted", _crafted_metadata, UnsafeCheckpointError, ["outside the allow-list (posix.system)"]),
]


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_one_line_of_its_error_class(case, tmp_path):
    load, file = case.make(tmp_path)
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError) as raised:
        load()
    message = str(raised.value)
    assert type(raised.value) is case.error, f"{type(raised.value).__name__}: {message}"
    assert "\n" not in message and str(file) in message, message
    for words in case.words:
        assert words in message, message
    assert _snapshot(tmp_path) == before  # loading wrote nothing (and no payload ran)
