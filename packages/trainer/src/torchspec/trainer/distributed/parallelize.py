"""How the draft and the target are spread over devices and which activations the draft keeps
for backward, applied to them from outside (in the style of torchtitan's ``parallelize``): the
model files hold the math only.

* Activation checkpointing of the draft (:func:`apply_activation_checkpointing`, applied before
  sharding): TTT keeps every step's activations for backward, ``ttt_length`` times per position.
  ``"mlp"`` (the trainer's default) recomputes the decoder layer's MLP (``draft.midlayer.mlp``) in
  backward: its ``[T, intermediate]`` tensors are the largest activations and the cheapest to
  recompute (about 5% more compute). ``"layer"`` (``ttt.gradient_checkpointing: true``)
  recomputes the whole decoder layer (``draft.midlayer``) of every TTT step, keeping only its inputs.
  ``"none"`` keeps everything. Gradients are the same in every mode.

* The draft: ``fc``, every projection of its decoder layer's attention and its MLP (one unit: its
  forward reads the weights of its three projections) are FSDP2 units,
  the TTT wrapper (``Eagle3Model``) is the root. ``lm_head`` stays in the root with the embedding
  and the norms: the chunked loss reads ``lm_head.weight`` inside the root's forward rather than
  calling ``lm_head``, so a unit of its own would never be gathered.
* The target (``training.shard_target``): each decoder layer, then the decoder, are FSDP2 units; its
  head stays whole and replicated because the loss reads it at every position.
* Gradients are summed over ranks, not averaged: each rank's loss is already divided by the global
  count of positions. Plain sums also work on gloo, which has no pre-scaled reduction.
"""

from __future__ import annotations

import torch
from torch import nn

from torchspec.draft_models import Eagle3Model
from torchspec.draft_models.layers import GatedMLP
from torchspec.trainer.targets.in_process import TargetModel

__all__ = [
    "ACTIVATION_CHECKPOINTING",
    "apply_activation_checkpointing",
    "checkpointed_modules",
    "draft_fsdp_units",
    "parallelize_draft",
    "parallelize_target",
]

# Mode -> the draft's module (qualified name under the draft) recomputed in backward.
ACTIVATION_CHECKPOINTING = {"none": None, "mlp": "midlayer.mlp", "layer": "midlayer"}


def apply_activation_checkpointing(model: Eagle3Model, mode: str) -> Eagle3Model:
    """Wrap the draft's module that ``mode`` names in torch's checkpoint wrapper (non-reentrant), so
    that its activations are recomputed in backward. Parameter and state-dict names do not change
    (the wrapper strips its prefix), so checkpoints are the same in every mode."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    if mode not in ACTIVATION_CHECKPOINTING:
        raise ValueError(f"activation checkpointing mode {mode!r}; choose one of {', '.join(ACTIVATION_CHECKPOINTING)}")
    name = ACTIVATION_CHECKPOINTING[mode]
    if name is not None:
        parent_name, _, child = name.rpartition(".")
        parent = model.draft.get_submodule(parent_name)
        setattr(parent, child, checkpoint_wrapper(getattr(parent, child)))
    return model


def checkpointed_modules(model: Eagle3Model) -> list[str]:
    """Qualified names (under ``model``) of the modules recomputed in backward."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    return [name for name, module in model.named_modules() if isinstance(module, CheckpointWrapper)]


def draft_fsdp_units(model: Eagle3Model) -> list[tuple[str, nn.Module]]:
    """The draft's FSDP2 units below the root, by qualified name."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX

    units: list[tuple[str, nn.Module]] = [("draft.fc", model.draft.fc)]
    mlps: list[str] = []
    for name, module in model.draft.midlayer.named_modules():  # parents before their children
        if any(name.startswith(f"{mlp}.") for mlp in mlps):
            continue  # a projection of the MLP, whose forward reads the weights of all three
        if isinstance(module, GatedMLP):
            mlps.append(name)
        if isinstance(module, (GatedMLP, nn.Linear)):
            unit_name = f"draft.midlayer.{name}.".replace(_CHECKPOINT_PREFIX, "").rstrip(".")
            units.append((unit_name, module))
    return units


def parallelize_draft(model: Eagle3Model, mesh, mp_policy=None) -> Eagle3Model:
    """FSDP2-shard the draft over ``mesh`` (``mp_policy``: see ``distributed.mixed_precision_policy``)."""
    from torch.distributed.fsdp import fully_shard

    kwargs = {"mesh": mesh} if mp_policy is None else {"mesh": mesh, "mp_policy": mp_policy}
    units = [fully_shard(module, **kwargs) for _, module in draft_fsdp_units(model)]
    units.append(fully_shard(model, **kwargs))
    for unit in units:
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    return model


def parallelize_target(target: TargetModel, mesh, device: torch.device, mp_policy=None) -> TargetModel:
    """FSDP2-shard the target's decoder onto ``device``, for targets too large for one device."""
    from torch.distributed.fsdp import fully_shard

    head = target.model.get_output_embeddings()
    target.keep_lm_head_weight(device)  # before a tied embedding table is sharded
    kwargs = {"mesh": mesh} if mp_policy is None else {"mesh": mesh, "mp_policy": mp_policy}
    for layer in target.layers:
        fully_shard(layer, **kwargs)
    fully_shard(target.decoder, **kwargs)  # moves the shards to the mesh's device
    head.to(device)
    return target
