"""``hatch run trainer:dump-states``: the target's hidden states for a dataset, computed once by vLLM
and written as a dump (layout: ``torchspec.trainer.targets.dump``).

It tokenizes the data exactly as training does (train and held-out splits), asks a vLLM engine for
the states of every sample and writes them to ``target.dump_dir``; ``target.backend=dump`` then
trains from the folder with no target decoder anywhere. One dump at a time holds the folder
(``loop.run_lock``); a second one is refused in one line. Shards are written whole (temporary name,
then rename), so a killed dump leaves whole shards only and a rerun of the same command computes
just the missing ones; the manifest's ``complete`` is set last.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from torchspec.trainer.config import ConfigError, TrainConfig
from torchspec.trainer.engine.launch import EngineWorker, check_engine_dtype, engine_options
from torchspec.trainer.loop.run_lock import LOCK_NAME, OutputDirLock
from torchspec.trainer.targets.dump import (
    DUMP_FORMAT,
    MANIFEST,
    SHARDS,
    check_same_dump,
    data_fingerprint,
    dump_samples,
    read_manifest,
    sample_key,
    shard_is_whole,
    shard_path,
    target_identity,
    write_manifest_file,
)
from torchspec.trainer.targets.engine import vllm_layer_ids
from torchspec.trainer.targets.head import TargetHead
from torchspec.trainer.targets.resolve import load_tokenizer, resolve_dtype, resolve_target_path

__all__ = ["DumpSummary", "dump_states"]

logger = logging.getLogger("torchspec.trainer")


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
    tc = config.target
    if tc.dump_dir is None:
        raise ConfigError("target.dump_dir is not set; name the folder the dump goes to (target.dump_dir=PATH)")
    if shard_size <= 0:
        raise ConfigError(f"--shard-size must be a positive number of samples, got {shard_size}")
    directory = Path(tc.dump_dir)
    _refuse_other_folders(directory)  # before the lock, which would leave its .lock in someone's folder
    # One dump per folder, held before anything is read or written: two dumps would write the same
    # shards, and the folder deleted under a live dump would otherwise be free for another one.
    with OutputDirLock(directory, key="target.dump_dir", activity="run") as lock:
        return _dump_states(config, directory, shard_size, log_path, lock)


def _refuse_other_folders(directory: Path) -> None:
    """A folder that holds something but no dump is not written into (checked again under the lock)."""
    if (
        directory.is_dir()
        and not (directory / MANIFEST).is_file()
        and any(path.name != LOCK_NAME for path in directory.iterdir())
    ):
        raise ConfigError(f"target.dump_dir {directory} exists and is not a dump; choose an empty or new folder")


def _dump_states(
    config: TrainConfig, directory: Path, shard_size: int, log_path: str | os.PathLike | None, lock: OutputDirLock
) -> DumpSummary:
    from torchspec.trainer.loop.training_data import load_training_data

    m = config.model
    started = time.perf_counter()
    target_path = resolve_target_path(m.target_model_path)
    head = TargetHead.from_pretrained(target_path, trust_remote_code=m.trust_remote_code)
    aux = head.validate_aux_layer_ids(m.aux_layer_ids)
    dtype = resolve_dtype(m.dtype, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    check_engine_dtype(head.config, dtype)
    tokenizer = load_tokenizer(m.tokenizer_path or target_path, m.trust_remote_code)
    data = load_training_data(config.data, tokenizer, config.training.seed, is_main=True)
    samples = dump_samples([data.train, data.eval], config.data.max_seq_length)
    manifest: dict[str, Any] = {
        "format": DUMP_FORMAT,
        "target": {"path": str(target_path), **target_identity(target_path)},
        "aux_layer_ids": aux,
        "vllm_layer_ids": vllm_layer_ids(aux, head.num_layers),
        "hidden_size": head.hidden_size,
        "dtype": str(dtype).removeprefix("torch."),
        "data": {
            "fingerprint": data_fingerprint(samples),
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
    previous = read_manifest(directory) if (directory / MANIFEST).is_file() else None
    if previous is not None:
        check_same_dump(previous, manifest, directory)
        manifest["shard_size"], manifest["num_shards"] = previous["shard_size"], previous["num_shards"]
        shard_size = previous["shard_size"]
    else:
        _refuse_other_folders(directory)
    (directory / SHARDS).mkdir(parents=True, exist_ok=True)
    for leftover in (directory / SHARDS).glob("*.partial"):  # of a killed dump; this one holds the folder
        leftover.unlink()
    if previous is None:
        write_manifest_file(directory / MANIFEST, manifest)

    missing = [k for k in range(manifest["num_shards"]) if not shard_is_whole(directory, k, samples, shard_size)]
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
                    out=str(shard_path(directory, shard)),
                    names=[sample_key(s) for s in chunk],
                )
                sent.append((shard, request))
                while len(sent) > 1 or (sent and position == len(missing) - 1):  # one shard queued ahead
                    done, request = sent.pop(0)
                    worker.reply(request)
                    logger.info(f"dump: shard {done + 1}/{manifest['num_shards']} written")
    lock.check()  # the folder deleted or replaced meanwhile: not marked complete
    manifest["complete"] = True
    manifest["bytes"] = sum(p.stat().st_size for p in (directory / SHARDS).glob("shard-*.safetensors"))
    write_manifest_file(directory / MANIFEST, manifest)
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
