"""What every target gives the training loop, wherever its hidden states come from.

For a batch a target yields a :class:`TargetOutput`:

* ``aux_hidden_states`` ``[B, T, 3 * H]``: the residual stream *entering* the decoder layers
  ``aux_layer_ids`` (low, mid, high), i.e. Hugging Face ``output_hidden_states[i]``;
* ``final_hidden`` ``[B, T, H]``: the output of the target's final norm, what its ``lm_head``
  consumes; the draft's loss computes the target distribution from it, chunk by chunk.

Three kinds implement it: ``targets.in_process.TargetModel`` (transformers in the trainer's
process) and the :class:`ServedTarget` subclasses whose states come from elsewhere
(``targets.engine``: vLLM; ``targets.dump``: files of ``dump-states``), which hold only the target's
head. ``states_to_output`` turns an engine's per-sample states into the same ``TargetOutput``.
The training loop imports this module, never an engine.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from torchspec.draft_models import default_aux_layer_ids
from torchspec.draft_models.aux_layers import validate_aux_layer_ids
from torchspec.draft_models.errors import UserInputError
from torchspec.trainer.config import ConfigError

if TYPE_CHECKING:
    from torchspec.trainer.targets.head import TargetHead

__all__ = ["ServedTarget", "TargetOutput", "TargetShape", "batch_key", "states_to_output", "unpadded_rows"]


@dataclass
class TargetOutput:
    aux_hidden_states: torch.Tensor  # [B, T, 3 * H]: low, mid, high
    final_hidden: torch.Tensor  # [B, T, H]


class TargetShape:
    """Shape facts and aux-layer choice shared by every kind of target."""

    config: Any
    num_layers: int

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.lm_head_weight.shape[0])

    @property
    def lm_head_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def default_aux_layer_ids(self) -> list[int]:
        return default_aux_layer_ids(self.num_layers)

    def validate_aux_layer_ids(self, aux_layer_ids: list[int] | None) -> list[int]:
        if aux_layer_ids is None:
            return self.default_aux_layer_ids()
        try:
            return validate_aux_layer_ids(aux_layer_ids, self.num_layers, source="model.aux_layer_ids")
        except UserInputError as err:
            raise ConfigError(f"{err} (default {self.default_aux_layer_ids()})") from None


class ServedTarget:
    """A target whose hidden states come from elsewhere (an engine, a dump): what the trainer reads
    of the target itself is its head. Subclasses are called like ``TargetModel``."""

    def __init__(self, head: TargetHead, aux_layer_ids: list[int]):
        self.head, self.aux_layer_ids = head, aux_layer_ids
        self.config, self.num_layers = head.config, head.num_layers

    hidden_size = property(lambda self: self.head.hidden_size)
    vocab_size = property(lambda self: self.head.vocab_size)
    lm_head_weight = property(lambda self: self.head.lm_head_weight)
    embed_tokens_weight = property(lambda self: self.head.embed_tokens_weight)

    def default_aux_layer_ids(self) -> list[int]:
        return self.head.default_aux_layer_ids()

    # True where asking ahead lets the states be computed while the draft trains (an engine).
    prefetches = False

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> TargetOutput:
        raise NotImplementedError

    def prefetch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Ask for a batch's states without waiting; calling the target on it later collects them."""

    def state_bytes(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
        """Bytes of a batch's states as they are handed over: the aux layers and the last layer for
        each of its tokens (padding is not sent), in the target's dtype."""
        layers = len(self.aux_layer_ids) + 1
        element = self.lm_head_weight.element_size()
        return int(attention_mask.sum()) * layers * self.hidden_size * element

    def discard_pending(self) -> None:
        """Drop the states asked for ahead (a resume changes what comes next)."""

    def check_covers(self, *splits: Any, max_seq_length: int) -> None:
        """Raise a one-line error if the states of some sample of ``splits`` cannot be had."""

    def close(self) -> None:
        """Release the engine or files behind the states."""


def unpadded_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[list[int]]:
    """The token ids of each row of a right-padded batch, without its padding."""
    rows = input_ids.tolist()
    if attention_mask is None:
        return rows
    return [row[:length] for row, length in zip(rows, attention_mask.sum(dim=1).tolist())]


def states_to_output(
    states: list[torch.Tensor], width: int, final_norm: nn.Module, device: torch.device | str = "cpu"
) -> TargetOutput:
    """A right-padded batch of per-sample engine states ``[T_i, 4, H]`` (the three aux layers, then
    the last layer's output before the final norm) as the ``TargetOutput`` the draft reads. Padded
    positions are zeros: nothing reads them (attention and loss masks exclude them)."""
    layers, hidden = states[0].shape[1:]
    padded = states[0].new_zeros(len(states), width, layers, hidden)
    for row, sample in enumerate(states):
        padded[row, : sample.shape[0]] = sample
    padded = padded.to(device)
    with torch.no_grad():
        final = final_norm(padded[:, :, -1])
    return TargetOutput(padded[:, :, :-1].flatten(2), final)


def batch_key(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> str:
    """What identifies a batch asked for ahead, so that the call for it later finds its states."""
    digest = hashlib.sha1(input_ids.cpu().numpy().tobytes())
    digest.update(attention_mask.cpu().numpy().tobytes())
    return digest.hexdigest()
