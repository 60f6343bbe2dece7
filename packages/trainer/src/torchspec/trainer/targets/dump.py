"""Offline hidden states: a dump's layout (written by ``commands.dump_states``) and the target reading one.

``hatch run trainer:dump-states [--config FILE] [overrides]`` tokenizes the data exactly as
training does (train and held-out splits), asks a vLLM engine for the states of every sample and
writes them to ``target.dump_dir``; ``target.backend=dump`` then trains from the folder with no
target decoder anywhere (only its head: final norm, ``lm_head``, embeddings).

Layout::

    manifest.json                 what was dumped (target, layers, data, dtype, shards); "complete"
    shards/shard-00000.safetensors   one tensor per sample, named by the sample key, [T, 4, H]:
                                  the three aux layers' inputs, then the last layer's output
                                  (before the final norm, which the trainer applies)

A sample's key is a hash of its token ids, so training finds its states whatever the batch order
or world size, and a dump serves any run whose samples it holds (``check_covers``). Shard ``k``
holds samples ``[k * shard_size, (k + 1) * shard_size)`` of the dump's sample list; each is written
to a temporary name and renamed, so a killed dump leaves whole shards only and a rerun of the same
command computes just the missing ones. ``complete`` is set last: a folder without it is refused
by training ("unfinished dump; rerun dump-states").
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from torchspec.draft_models.atomic import write_file_atomic
from torchspec.draft_models.aux_layers import validate_aux_layer_ids
from torchspec.draft_models.errors import UserInputError
from torchspec.trainer.config import ConfigError
from torchspec.trainer.targets.contract import ServedTarget, TargetOutput, states_to_output, unpadded_rows
from torchspec.trainer.targets.head import TargetHead

__all__ = [
    "DUMP_FORMAT",
    "MANIFEST",
    "SHARDS",
    "DumpTarget",
    "check_same_dump",
    "data_fingerprint",
    "dump_samples",
    "identity_difference",
    "read_manifest",
    "sample_key",
    "shard_is_whole",
    "shard_path",
    "target_identity",
    "weights_fingerprint",
    "write_manifest_file",
]

logger = logging.getLogger("torchspec.trainer")

DUMP_FORMAT = 1
MANIFEST = "manifest.json"
SHARDS = "shards"


def sample_key(token_ids: list[int]) -> str:
    """The name a sample's states have in a dump: a hash of its token ids."""
    return hashlib.sha256(torch.tensor(token_ids, dtype=torch.int64).numpy().tobytes()).hexdigest()[:32]


# What of each weight file the fingerprint reads: the whole header (every tensor's name, dtype,
# shape and place) and, from the data, a slice of up to _SAMPLED_TENSORS tensors spread over the file
# plus _SAMPLED_CHUNKS evenly spaced chunks: at most ~80 KiB a file, a few MB for a TB-size target.
_SAMPLED_TENSORS = 64
_TENSOR_SLICE = 256
_SAMPLED_CHUNKS = 8
_CHUNK = 4096


def weights_fingerprint(path: Path) -> str:
    """sha256 of a safetensors file's header and of bytes sampled from its tensors.

    Another fine-tune of the same architecture has the same config, file names and sizes, and
    header; its weights differ everywhere a fine-tune changes them, hence in the sampled bytes. A
    change confined to tensors that are not sampled is not seen (reading them all costs a full read
    of the target)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ConfigError(f"{path} is not a safetensors file (shorter than its header); save the target again")
        size = int.from_bytes(head, "little")
        header = handle.read(size)
        try:
            entries = json.loads(header)
        except ValueError:
            raise ConfigError(f"{path} has no readable safetensors header; save the target again") from None
        digest.update(head + header)
        start = 8 + size
        end = path.stat().st_size
        spans = sorted(
            tuple(entry["data_offsets"])
            for name, entry in entries.items()
            if name != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry
        )
        chosen = spans[:: max(1, -(-len(spans) // _SAMPLED_TENSORS))]
        offsets = [start + (begin + stop) // 2 for begin, stop in chosen]  # the middle: past any shared prefix
        lengths = [min(_TENSOR_SLICE, stop - (begin + stop) // 2) for begin, stop in chosen]
        for k in range(_SAMPLED_CHUNKS):
            offsets.append(start + (end - start) * k // _SAMPLED_CHUNKS)
            lengths.append(_CHUNK)
        for offset, length in zip(offsets, lengths):
            handle.seek(offset)
            digest.update(handle.read(max(length, 0)))
    return digest.hexdigest()


def target_identity(path: Path) -> dict[str, Any]:
    """What identifies a target: its config, its weight files' names and sizes, and a fingerprint of
    each safetensors file's contents (:func:`weights_fingerprint`)."""
    files = sorted(p for p in path.iterdir() if p.suffix == ".safetensors" or p.name.endswith(".index.json"))
    return {
        "config_sha256": hashlib.sha256((path / "config.json").read_bytes()).hexdigest(),
        "weight_files": {p.name: p.stat().st_size for p in files},
        "weights_sha256": {p.name: weights_fingerprint(p) for p in files if p.suffix == ".safetensors"},
    }


def identity_difference(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """What differs between two :func:`target_identity` records, in words, or None."""
    if saved.get("config_sha256") != current["config_sha256"]:
        return "its config.json differs"
    if saved.get("weight_files") != current["weight_files"]:
        return "its weight files' names or sizes differ"
    fingerprints = saved.get("weights_sha256")
    if fingerprints is None:
        return (
            "the dump records no fingerprint of the weights (written before torchspec-trainer 0.7.0), so another "
            "fine-tune of that architecture cannot be told apart"
        )
    differing = sorted(name for name, value in current["weights_sha256"].items() if fingerprints.get(name) != value)
    if differing:
        return f"the weights in {', '.join(differing[:3])}{', ...' if len(differing) > 3 else ''} differ"
    return None


def dump_samples(datasets_: list[Any], max_seq_length: int) -> list[list[int]]:
    """Every distinct sample of the splits, cut as the batches cut them, in order."""
    seen, samples = set(), []
    for dataset in datasets_:
        if dataset is None:
            continue
        for ids in dataset["input_ids"]:
            ids = list(ids)[:max_seq_length]
            key = sample_key(ids)
            if key not in seen:
                seen.add(key)
                samples.append(ids)
    return samples


def data_fingerprint(samples: list[list[int]]) -> str:
    digest = hashlib.sha256()
    for ids in samples:
        digest.update(sample_key(ids).encode())
    return digest.hexdigest()


def write_manifest_file(path: Path, value: dict) -> None:
    write_file_atomic(path, json.dumps(value, indent=2) + "\n")  # a kill leaves the old manifest whole


# --- writing ------------------------------------------------------------------------------------------


def shard_path(directory: Path, shard: int) -> Path:
    return directory / SHARDS / f"shard-{shard:05d}.safetensors"


def shard_is_whole(directory: Path, shard: int, samples: list[list[int]], shard_size: int) -> bool:
    from safetensors import SafetensorError, safe_open

    path = shard_path(directory, shard)
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
    except (SafetensorError, OSError):
        return False  # written partly by something else: computed again
    return keys == {sample_key(s) for s in samples[shard * shard_size : (shard + 1) * shard_size]}


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path} cannot be read ({err}); the folder is not a hidden-state dump") from None
    if not isinstance(manifest, dict) or manifest.get("format") != DUMP_FORMAT:
        raise ConfigError(f"{path}: not a dump of format {DUMP_FORMAT}; write it again with dump-states")
    return manifest


def check_same_dump(previous: dict, current: dict, directory: Path) -> None:
    """A rerun continues a dump only of the same target, layers, dtype and data."""
    dumped = previous.get("target") or {}
    difference = identity_difference(dumped, current["target"])
    if difference is not None:
        raise ConfigError(
            f"target.dump_dir {directory} holds a dump of another target ({dumped.get('path')}): "
            f"{difference}; dump to another folder or delete that one"
        )
    for what, key in (
        ("layers", ("vllm_layer_ids",)),
        ("dtype", ("dtype",)),
        ("data", ("data", "fingerprint")),
    ):
        old: Any = previous
        new: Any = current
        for part in key:
            old, new = old.get(part), new.get(part)
        if old != new:
            raise ConfigError(
                f"target.dump_dir {directory} holds a dump of other {what} ({'.'.join(key)}: {old!r}, this config: "
                f"{new!r}); dump to another folder or delete that one"
            )


# --- reading ------------------------------------------------------------------------------------------


class DumpTarget(ServedTarget):
    """The trainer's target interface over a finished dump: the head from the target folder, the
    states of each batch row looked up by its sample key."""

    def __init__(self, head: TargetHead, directory: Path, manifest: dict[str, Any]):
        from safetensors import safe_open

        super().__init__(head, list(manifest["aux_layer_ids"]))
        self.directory, self.manifest = directory, manifest
        self._where: dict[str, Path] = {}  # sample key -> its shard
        for shard in sorted((directory / SHARDS).glob("shard-*.safetensors")):
            with safe_open(str(shard), framework="pt") as handle:
                self._where.update(dict.fromkeys(handle.keys(), shard))
        # A few shards open at a time: a large dump has thousands, more than a process may open.
        self._open = functools.lru_cache(maxsize=16)(lambda shard: safe_open(str(shard), framework="pt"))

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike,
        target_path: Path,
        aux_layer_ids: list[int] | None,
        dtype: torch.dtype,
        device: torch.device | str,
        trust_remote_code: bool = False,
    ) -> DumpTarget:
        directory = Path(directory)
        if not (directory / MANIFEST).is_file():
            raise ConfigError(
                f"target.dump_dir {directory} holds no dump (no {MANIFEST}); write one with "
                "`hatch run trainer:dump-states` and the same config"
            )
        manifest = read_manifest(directory)
        if not manifest.get("complete"):
            done = len(list((directory / SHARDS).glob("shard-*.safetensors")))
            raise ConfigError(
                f"target.dump_dir {directory} is an unfinished dump ({done} of {manifest.get('num_shards')} shards); "
                "run the same `hatch run trainer:dump-states` command again to finish it"
            )
        head = TargetHead.from_pretrained(target_path, dtype, device, trust_remote_code)
        saved = manifest["target"]
        difference = identity_difference(saved, target_identity(target_path))
        if difference is not None:
            raise ConfigError(
                f"target.dump_dir {directory} was dumped from another target ({saved.get('path')}) than "
                f"model.target_model_path {target_path}: {difference}; train with that target or dump again"
            )
        try:  # a hand-edited manifest must not lead to advice the engines would not serve
            validate_aux_layer_ids(manifest["aux_layer_ids"], head.num_layers, f"{directory / MANIFEST} aux_layer_ids")
        except UserInputError as err:
            raise ConfigError(f"{err}, or dump again") from None
        aux = head.validate_aux_layer_ids(aux_layer_ids)
        if aux != list(manifest["aux_layer_ids"]):
            raise ConfigError(
                f"target.dump_dir {directory} holds aux layers {manifest['aux_layer_ids']}, this run asks for "
                f"model.aux_layer_ids {aux}; set model.aux_layer_ids={manifest['aux_layer_ids']} or dump again"
            )
        return cls(head, directory, manifest)

    def check_covers(self, *splits: Any, max_seq_length: int) -> None:
        """Every sample this run trains or evaluates on must be in the dump."""
        samples = dump_samples(list(splits), max_seq_length)
        missing = sum(sample_key(s) not in self._where for s in samples)
        if missing:
            data = self.manifest["data"]
            raise ConfigError(
                f"target.dump_dir {self.directory} lacks the states of {missing} of this run's {len(samples)} samples: "
                f"it was dumped from other data (data.train_path {data['train_path']}, chat_template "
                f"{data['chat_template']}, max_seq_length {data['max_seq_length']}); dump again with this config"
            )

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> TargetOutput:
        states = []
        for row in unpadded_rows(input_ids, attention_mask):
            key = sample_key(row)
            if key not in self._where:
                raise ConfigError(f"target.dump_dir {self.directory} holds no states for a sample of this run")
            states.append(self._open(self._where[key]).get_tensor(key).to(self.head.lm_head_weight.dtype))
        return states_to_output(states, input_ids.shape[1], self.head.final_norm, input_ids.device)

    def close(self) -> None:
        self._open.cache_clear()
