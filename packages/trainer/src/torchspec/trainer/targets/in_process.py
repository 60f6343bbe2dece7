"""The target in the trainer's process (transformers): the hidden states an EAGLE-3 draft reads from it.

For a batch the target yields

* ``aux_hidden_states`` ``[B, T, 3 * H]``: the residual stream *entering* the decoder layers
  ``aux_layer_ids`` (low, mid, high), i.e. Hugging Face ``output_hidden_states[i]``. Forward
  pre-hooks on those three layers catch them, so the other layers' states are never kept.
* ``final_hidden`` ``[B, T, H]``: the output of the target's final norm, what its ``lm_head``
  consumes; the draft's loss computes the target distribution from it, chunk by chunk.

The causal-LM head is never run over the batch: the decoder (``model.base_model``) is called
directly and the ``[B, T, vocab]`` logits are left to the loss.

When an engine computes the hidden states instead (``targets.engine``, ``targets.dump``), the
trainer holds only a ``targets.head.TargetHead``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from torchspec.trainer.config import ConfigError
from torchspec.trainer.targets.contract import TargetOutput, TargetShape

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["FINAL_NORM_NAMES", "TargetModel", "load_causal_lm", "remote_code_hint"]

# What transformers loads weights from: single files, shards with their index.
_WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")


def _decoder_layers(decoder: nn.Module, num_layers: int) -> nn.ModuleList:
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return layers
    for module in decoder.modules():  # GPT-2 style names (`h`, `blocks`)
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise ConfigError(
        f"cannot find the {num_layers} decoder layers of {type(decoder).__name__}; "
        "the target must be a Hugging Face decoder-only causal LM"
    )


@contextlib.contextmanager
def remote_code_hint(path: Path) -> Iterator[None]:
    """transformers' refusal of a model that needs its own code, as a one-line config error."""
    try:
        yield
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise ConfigError(
                f"the target at {path} needs its own code; set model.trust_remote_code=true if you trust it"
            ) from None
        raise


def load_causal_lm(
    path: str | os.PathLike, setting: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> PreTrainedModel:
    """A local Hugging Face causal LM (``config.json`` + weights) in evaluation mode. A folder that is
    not one, lacks its weights or holds a damaged weight file is a ``ConfigError`` (a
    ``DamagedCheckpointError`` naming the file) that names ``setting``, the option that gave ``path``."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    from torchspec.draft_models import open_safetensors

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"{setting} {path} is not a Hugging Face model folder (no config.json there); "
            "point it at a local folder written by save_pretrained"
        )
    if not any(next(path.glob(pattern), None) for pattern in _WEIGHT_FILES):
        raise ConfigError(
            f"{setting} {path} has a config.json but no weights (model.safetensors, pytorch_model.bin or a "
            "sharded index); copy the weight files there or point it at the complete folder"
        )
    try:
        with remote_code_hint(path):
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=trust_remote_code)
    except SafetensorError:
        for file in sorted(path.glob("*.safetensors")):  # which one: the damaged file raises, naming itself
            with open_safetensors(file):
                pass
        raise
    except OSError as err:  # e.g. a shard the index names is missing
        raise ConfigError(f"{setting} {path}: the weights cannot be loaded ({str(err).splitlines()[0]})") from err
    return model.eval()


class TargetModel(TargetShape):
    """A Hugging Face causal LM in evaluation mode, frozen, with aux-layer capture."""

    def __init__(self, model: PreTrainedModel, aux_layer_ids: list[int] | None = None):
        self.model = model.eval().requires_grad_(False)
        self.config = model.config
        self.decoder = model.base_model
        self.layers = _decoder_layers(self.decoder, int(self.config.num_hidden_layers))
        self.aux_layer_ids = self.validate_aux_layer_ids(aux_layer_ids)
        self._captured: dict[int, torch.Tensor] = {}
        self._capturing = False
        for layer_id in self.aux_layer_ids:
            self.layers[layer_id].register_forward_pre_hook(self._capture_hook(layer_id), with_kwargs=True)
        self._lm_head_weight: torch.Tensor | None = None

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        aux_layer_ids: list[int] | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        trust_remote_code: bool = False,
    ) -> TargetModel:
        """Load a local Hugging Face causal-LM folder (``config.json`` + weights)."""
        model = load_causal_lm(path, "model.target_model_path", dtype, trust_remote_code)
        return cls(model.to(device), aux_layer_ids)

    @property
    def num_layers(self) -> int:  # type: ignore[override]  # the layers found, not a stored count
        return len(self.layers)

    @property
    def vocab_size(self) -> int:  # without gathering a sharded head
        return int(self.model.get_output_embeddings().weight.shape[0])

    # --- weights the draft needs ----------------------------------------------------------------

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The target's output projection ``[vocab, H]`` (gathered once if the target is sharded)."""
        if self._lm_head_weight is None:
            self._lm_head_weight = _full(self.model.get_output_embeddings().weight).detach()
        return self._lm_head_weight

    @property
    def embed_tokens_weight(self) -> torch.Tensor:
        """The input embedding table ``[vocab, H]`` (a collective call when the target is sharded)."""
        return _full(self.model.get_input_embeddings().weight).detach()

    # --- capture --------------------------------------------------------------------------------

    def _capture_hook(self, layer_id: int):
        def hook(module, args, kwargs):
            if self._capturing:
                self._captured[layer_id] = args[0] if args else kwargs["hidden_states"]

        return hook

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> TargetOutput:
        # no_grad rather than inference_mode: the outputs feed the draft's autograd graph, which
        # must save them for backward (inference tensors cannot be saved).
        self._capturing = True
        try:
            out = self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            captured = [self._captured[i] for i in self.aux_layer_ids]
            if hasattr(self.decoder, "reshard"):  # FSDP keeps a root gathered when no backward follows
                self.decoder.reshard()
        finally:
            self._capturing = False
            self._captured = {}
        return TargetOutput(torch.cat(captured, dim=-1), out.last_hidden_state)

    # --- distribution (applied from outside: torchspec.trainer.distributed.parallelize) ----------------------

    def keep_lm_head_weight(self, device: torch.device) -> None:
        """Keep a whole copy of the head's weight on ``device`` for the loss, which reads it at every
        position; taken before the decoder (and a tied embedding table) is sharded."""
        self._lm_head_weight = self.model.get_output_embeddings().weight.detach().to(device)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


# --- the target's head alone, for targets served elsewhere ------------------------------------------

FINAL_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_norm")
