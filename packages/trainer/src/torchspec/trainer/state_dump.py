"""Offline hidden states: the target's states for a dataset, computed once by vLLM and kept on disk.

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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from torchspec.draft_models.aux_layers import validate_aux_layer_ids
from torchspec.draft_models.errors import UserInputError
from torchspec.trainer.checkpoint import _write_atomic
from torchspec.trainer.config import ConfigError, TrainConfig
from torchspec.trainer.target import ServedTarget, TargetHead, TargetOutput, states_to_output, unpadded_rows

__all__ = ["DUMP_FORMAT", "DumpTarget", "dump_states", "sample_key", "target_identity"]

logger = logging.getLogger("torchspec.trainer")

DUMP_FORMAT = 1
MANIFEST = "manifest.json"
_SHARDS = "shards"


def sample_key(token_ids: list[int]) -> str:
    """The name a sample's states have in a dump: a hash of its token ids."""
    return hashlib.sha256(torch.tensor(token_ids, dtype=torch.int64).numpy().tobytes()).hexdigest()[:32]


def target_identity(path: Path) -> dict[str, Any]:
    """What identifies a target's weights without reading them: its config and its weight files' names and sizes."""
    files = sorted(p for p in path.iterdir() if p.suffix == ".safetensors" or p.name.endswith(".index.json"))
    return {
        "config_sha256": hashlib.sha256((path / "config.json").read_bytes()).hexdigest(),
        "weight_files": {p.name: p.stat().st_size for p in files},
    }


def _samples(datasets_: list[Any], max_seq_length: int) -> list[list[int]]:
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


def _data_fingerprint(samples: list[list[int]]) -> str:
    digest = hashlib.sha256()
    for ids in samples:
        digest.update(sample_key(ids).encode())
    return digest.hexdigest()


def _write_json(path: Path, value: dict) -> None:
    _write_atomic(path, json.dumps(value, indent=2) + "\n")  # a kill leaves the old manifest whole


# --- writing ------------------------------------------------------------------------------------------


@dataclass
class DumpSummary:
    directory: Path
    num_samples: int
    num_tokens: int
    shards_written: int
    shards_reused: int
    bytes: int
    seconds: float

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(self.num_tokens, 1)


def dump_states(config: TrainConfig, shard_size: int = 256, log_path: str | os.PathLike | None = None) -> DumpSummary:
    """Write (or finish) the dump of ``config``'s data at ``config.target.dump_dir``."""
    from torchspec.trainer.engine_target import EngineWorker, check_engine_dtype, engine_options, vllm_layer_ids
    from torchspec.trainer.trainer import _dtype, _load_tokenizer, _target_path
    from torchspec.trainer.training_data import load_training_data

    m, tc = config.model, config.target
    if tc.dump_dir is None:
        raise ConfigError("target.dump_dir is not set; name the folder the dump goes to (target.dump_dir=PATH)")
    if shard_size <= 0:
        raise ConfigError(f"--shard-size must be a positive number of samples, got {shard_size}")
    started = time.perf_counter()
    directory = Path(tc.dump_dir)
    target_path = _target_path(m.target_model_path)
    head = TargetHead.from_pretrained(target_path, trust_remote_code=m.trust_remote_code)
    aux = head.validate_aux_layer_ids(m.aux_layer_ids)
    dtype = _dtype(m.dtype, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    check_engine_dtype(head.config, dtype)
    tokenizer = _load_tokenizer(m.tokenizer_path or target_path, m.trust_remote_code)
    data = load_training_data(config.data, tokenizer, config.training.seed, is_main=True)
    samples = _samples([data.train, data.eval], config.data.max_seq_length)
    manifest: dict[str, Any] = {
        "format": DUMP_FORMAT,
        "target": {"path": str(target_path), **target_identity(target_path)},
        "aux_layer_ids": aux,
        "vllm_layer_ids": vllm_layer_ids(aux, head.num_layers),
        "hidden_size": head.hidden_size,
        "dtype": str(dtype).removeprefix("torch."),
        "data": {
            "fingerprint": _data_fingerprint(samples),
            "num_samples": len(samples),
            "num_tokens": sum(len(s) for s in samples),
            "train_path": config.data.train_path,
            "eval_path": config.data.eval_path,
            "chat_template": config.data.chat_template,
            "max_seq_length": config.data.max_seq_length,
        },
        "shard_size": shard_size,
        "num_shards": -(-len(samples) // shard_size),
        "complete": False,
    }
    previous = _read_manifest(directory) if (directory / MANIFEST).is_file() else None
    if previous is not None:
        _check_same_dump(previous, manifest, directory)
        manifest["shard_size"], manifest["num_shards"] = previous["shard_size"], previous["num_shards"]
        shard_size = previous["shard_size"]
    elif directory.exists() and any(directory.iterdir()):
        raise ConfigError(f"target.dump_dir {directory} exists and is not a dump; choose an empty or new folder")
    (directory / _SHARDS).mkdir(parents=True, exist_ok=True)
    if previous is None:
        _write_json(directory / MANIFEST, manifest)

    missing = [k for k in range(manifest["num_shards"]) if not _shard_is_whole(directory, k, samples, shard_size)]
    reused = manifest["num_shards"] - len(missing)
    if reused:
        logger.info(
            f"dump: {reused} of {manifest['num_shards']} shards already in {directory}; computing {len(missing)}"
        )
    if missing:
        with EngineWorker(
            target_path,
            layer_ids=manifest["vllm_layer_ids"],
            dtype=manifest["dtype"],
            max_model_len=config.data.max_seq_length + 2,
            log_path=log_path or directory / "engine.log",
            **engine_options(config),
        ) as worker:
            sent: list[tuple[int, int]] = []
            for position, shard in enumerate(missing):
                chunk = samples[shard * shard_size : (shard + 1) * shard_size]
                request = worker.send(
                    "extract",
                    prompts=chunk,
                    out=str(_shard_path(directory, shard)),
                    names=[sample_key(s) for s in chunk],
                )
                sent.append((shard, request))
                while len(sent) > 1 or (sent and position == len(missing) - 1):  # one shard queued ahead
                    done, request = sent.pop(0)
                    worker.reply(request)
                    logger.info(f"dump: shard {done + 1}/{manifest['num_shards']} written")
    manifest["complete"] = True
    manifest["bytes"] = sum(p.stat().st_size for p in (directory / _SHARDS).glob("shard-*.safetensors"))
    _write_json(directory / MANIFEST, manifest)
    summary = DumpSummary(
        directory,
        len(samples),
        manifest["data"]["num_tokens"],
        len(missing),
        reused,
        manifest["bytes"],
        time.perf_counter() - started,
    )
    logger.info(
        f"dump: {summary.num_samples} samples, {summary.num_tokens} tokens, {summary.bytes / 2**20:.1f} MiB "
        f"({summary.bytes_per_token / 1024:.2f} KiB per token) in {directory} ({summary.seconds:.0f} s); "
        f"train from it with target.backend=dump target.dump_dir={directory}"
    )
    return summary


def _shard_path(directory: Path, shard: int) -> Path:
    return directory / _SHARDS / f"shard-{shard:05d}.safetensors"


def _shard_is_whole(directory: Path, shard: int, samples: list[list[int]], shard_size: int) -> bool:
    from safetensors import SafetensorError, safe_open

    path = _shard_path(directory, shard)
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
    except (SafetensorError, OSError):
        return False  # written partly by something else: computed again
    return keys == {sample_key(s) for s in samples[shard * shard_size : (shard + 1) * shard_size]}


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path} cannot be read ({err}); the folder is not a hidden-state dump") from None
    if not isinstance(manifest, dict) or manifest.get("format") != DUMP_FORMAT:
        raise ConfigError(f"{path}: not a dump of format {DUMP_FORMAT}; write it again with dump-states")
    return manifest


def _check_same_dump(previous: dict, current: dict, directory: Path) -> None:
    """A rerun continues a dump only of the same target, layers, dtype and data."""
    for what, key in (
        ("target", ("target", "config_sha256")),
        ("target weights", ("target", "weight_files")),
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
        for shard in sorted((directory / _SHARDS).glob("shard-*.safetensors")):
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
        manifest = _read_manifest(directory)
        if not manifest.get("complete"):
            done = len(list((directory / _SHARDS).glob("shard-*.safetensors")))
            raise ConfigError(
                f"target.dump_dir {directory} is an unfinished dump ({done} of {manifest.get('num_shards')} shards); "
                "run the same `hatch run trainer:dump-states` command again to finish it"
            )
        head = TargetHead.from_pretrained(target_path, dtype, device, trust_remote_code)
        identity = target_identity(target_path)
        saved = manifest["target"]
        if (
            saved.get("config_sha256") != identity["config_sha256"]
            or saved.get("weight_files") != identity["weight_files"]
        ):
            raise ConfigError(
                f"target.dump_dir {directory} was dumped from another target ({saved.get('path')}) than "
                f"model.target_model_path {target_path}; train with that target or dump again"
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
        samples = _samples(list(splits), max_seq_length)
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
