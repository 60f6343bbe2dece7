"""Export a training checkpoint to the serving folder (config.json + model.safetensors).

The checkpoint is read one tensor at a time, cast and streamed into model.safetensors, so peak
memory is about one tensor, not the model. The folder is written under a temporary name, checked against the
serving contract, and only then published (``torchspec.draft_models.atomic.publish_dir``: its files
fsynced, then one atomic swap with a replaced folder where the kernel has ``renameat2``, else the old
folder moved aside and deleted last). At every instant the destination is the old folder or the new
one; an export killed between the two moves has its previous folder put back by the next export
before anything else (``recover_replaced_dir``), so it is never deleted as abandoned. A destination that
cannot be written (read-only, not a folder, a full disk) is one ``ConverterError`` naming it, after
the staging folder is removed and any replaced folder is back in place.
"""

from __future__ import annotations

import errno
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch

from torchspec.converter.errors import ConverterError
from torchspec.converter.safetensors_stream import TensorSpec, write_safetensors
from torchspec.converter.vocab_pruning import head_rows_for
from torchspec.draft_models import open_safetensors
from torchspec.draft_models.atomic import make_staging_dir, publish_dir, recover_replaced_dir, remove_abandoned_staging
from torchspec.draft_models.checkpoint_layout import CheckpointNotFoundError, TrainingCheckpoint
from torchspec.draft_models.config import DTYPES
from torchspec.draft_models.serving_folder import Finding, check_serving_folder, serving_config

__all__ = ["ExportResult", "export_checkpoint"]


@dataclass
class ExportResult:
    output: Path
    checkpoint: Path
    num_parameters: int
    draft_vocab_size: int
    findings: list[Finding] = field(default_factory=list)


def _target_config(target_model_path: str | None) -> dict:
    if target_model_path is None:
        return {}
    path = Path(target_model_path) / "config.json"
    if not path.is_file():
        raise ConverterError(f"--target-model-path {target_model_path}: no config.json there")
    return json.loads(path.read_text())


def _target_embedding(target_model_path: str) -> tuple[tuple[int, ...], Callable[[], torch.Tensor]]:
    """Shape of the target's embedding table and a function that reads it."""
    for file in sorted(Path(target_model_path).glob("*.safetensors")):
        with open_safetensors(file) as handle:
            for key in handle.keys():
                if key.endswith("embed_tokens.weight"):
                    shape = tuple(handle.get_slice(key).get_shape())

                    def read(file=file, key=key):
                        with open_safetensors(file) as again:
                            return again.get_tensor(key)

                    return shape, read
    raise ConverterError(f"--target-model-path {target_model_path}: no *embed_tokens.weight in its safetensors files")


def export_checkpoint(
    input_path: str | Path,
    output_path: str | Path | None = None,
    dtype: str | None = None,
    include_embeddings: bool = False,
    target_model_path: str | None = None,
    force: bool = False,
    new_draft_target_ids: torch.Tensor | None = None,
) -> ExportResult:
    """Write the serving folder for ``input_path``. ``new_draft_target_ids`` (sorted target ids of a
    smaller draft vocabulary) prunes the head after training."""
    try:
        checkpoint = TrainingCheckpoint.open(input_path)
    except CheckpointNotFoundError as err:  # the converter's own error type for every user mistake
        raise ConverterError(str(err)) from None
    output = Path(output_path) if output_path is not None else Path(str(Path(input_path)).rstrip("/") + "_hf")
    if output.exists() and not force:
        raise ConverterError(f"{output} already exists; pass --force to replace it")
    if dtype is not None and dtype not in DTYPES:
        raise ConverterError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    config = checkpoint.config
    names = checkpoint.weight_names()
    if not names:
        raise ConverterError(f"{checkpoint.path}: no draft weights under 'model.' in this checkpoint")
    if config.is_vocab_pruned and "d2t" not in names:
        raise ConverterError(
            f"{checkpoint.path}: config.json says draft_vocab_size={config.draft_vocab_size} < vocab_size="
            f"{config.vocab_size} but the checkpoint holds no d2t mapping; re-train with the vocab mapping or fix "
            "config.json"
        )
    target = _target_config(target_model_path)
    with_embeddings = include_embeddings or config.hidden_size != config.target_hidden_size

    old_d2t = checkpoint.load_tensor("d2t") if config.is_vocab_pruned else None
    head_rows = None
    draft_vocab_size = cast(int, config.draft_vocab_size)  # an int once the config's __post_init__ ran
    if new_draft_target_ids is not None:
        head_rows = head_rows_for(new_draft_target_ids, config.vocab_size, old_d2t)
        draft_vocab_size = int(new_draft_target_ids.numel())

    # By default the dtype the draft config names: the serving dtype (the trainer writes the target's,
    # which is what vLLM and SGLang run the draft in), not the float32 master weights.
    out_dtype = DTYPES[dtype] if dtype else (config.declared_dtype or torch.bfloat16)

    def from_checkpoint(name, rows=None):
        def produce():
            tensor = checkpoint.load_tensor(name)
            if rows is not None:
                tensor = tensor.index_select(0, rows)
            return tensor.to(out_dtype) if tensor.is_floating_point() else tensor

        return produce

    specs: list[TensorSpec] = []
    for name in names:
        if name == "embed_tokens.weight" and not with_embeddings:
            continue
        if name in ("d2t", "t2d") and head_rows is not None:
            continue
        shape, stored_dtype = checkpoint.tensor_info(name)
        produce = from_checkpoint(name)
        if name == "embed_tokens.weight" and target_model_path is not None:
            shape, read = _target_embedding(target_model_path)
            produce = lambda read=read: read().to(out_dtype)  # noqa: E731
        if name == "lm_head.weight" and head_rows is not None:
            shape, produce = (len(head_rows), shape[1]), from_checkpoint(name, head_rows)
        specs.append(TensorSpec(name, shape, out_dtype if stored_dtype.is_floating_point else stored_dtype, produce))
    if head_rows is not None and draft_vocab_size < config.vocab_size:
        new_ids = cast(torch.Tensor, new_draft_target_ids).long()  # head_rows come from them
        t2d = torch.zeros(config.vocab_size, dtype=torch.bool)
        t2d[new_ids] = True
        specs.append(
            TensorSpec("d2t", (draft_vocab_size,), torch.int64, lambda: new_ids - torch.arange(draft_vocab_size))
        )
        specs.append(TensorSpec("t2d", (config.vocab_size,), torch.bool, lambda: t2d))
    num_target_layers = checkpoint.num_target_layers or target.get("num_hidden_layers")
    if checkpoint.aux_layer_ids is None and num_target_layers is None:
        # The engines would fall back to a default of their own, which need not be what training used.
        raise ConverterError(
            f"{checkpoint.path} records no aux layer ids (no aux_layers.json); pass "
            "--target-model-path (the target it was trained with: its default ids are written) or add aux_layers.json"
        )
    config_json = serving_config(
        config,
        out_dtype,
        draft_vocab_size=draft_vocab_size,
        aux_layer_ids=checkpoint.aux_layer_ids,
        num_target_layers=num_target_layers,
        special_tokens={key: target[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if key in target},
    )

    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        recover_replaced_dir(output)  # a killed export's previous folder back in place first
        remove_abandoned_staging(output)
        staging = make_staging_dir(output)
    except OSError as err:
        raise _unwritable(output, err) from None
    try:
        write_safetensors(staging / "model.safetensors", specs, metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
        findings = check_serving_folder(staging)
        errors = [f for f in findings if f.level == "error"]
        if errors:
            raise ConverterError(f"the exported folder breaks the serving contract: {errors[0].message}")
        publish_dir(staging, output)  # the old folder or the new one, at every instant
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        # Reads fail with the checkpoint's own errors (ConverterError, DamagedCheckpointError, ...),
        # so an OSError here is the destination's: full, read-only, gone.
        if isinstance(err, OSError):
            raise _unwritable(output, err) from None
        raise
    num_parameters = sum(s.nbytes // out_dtype.itemsize for s in specs if s.dtype.is_floating_point)
    return ExportResult(output, checkpoint.path, num_parameters, draft_vocab_size, findings)


def _unwritable(output: Path, err: OSError) -> ConverterError:
    """The one line for a destination the export cannot write; nothing of the export is left there."""
    reason = err.strerror or str(err)
    existing = next((path for path in (output.parent, *output.parent.parents) if path.exists()), None)
    if existing is not None and not existing.is_dir():
        reason = f"{existing} is a file, not a folder"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free space there or choose another --output"
    else:
        fix = "choose a folder this user can write with --output"
    return ConverterError(f"cannot write the export {output} ({reason}); nothing was left in {output.parent}: {fix}")
