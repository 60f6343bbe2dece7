"""The frozen target model and the hidden states an EAGLE-3 draft reads from it.

For a batch the target yields

* ``aux_hidden_states`` ``[B, T, 3 * H]``: the residual stream *entering* the decoder layers
  ``aux_layer_ids`` (low, mid, high), i.e. Hugging Face ``output_hidden_states[i]``. Forward
  pre-hooks on those three layers catch them, so the other layers' states are never kept.
* ``final_hidden`` ``[B, T, H]``: the output of the target's final norm, what its ``lm_head``
  consumes; the draft's loss computes the target distribution from it, chunk by chunk.

The causal-LM head is never run over the batch: the decoder (``model.base_model``) is called
directly and the ``[B, T, vocab]`` logits are left to the loss.

``TargetModel`` runs the target in the trainer's process (transformers). When an engine computes the
hidden states instead (``torchspec.trainer.engine_target``, ``torchspec.trainer.state_dump``), the
trainer holds only a ``TargetHead``: the config, the final norm, ``lm_head`` and the embedding table,
read from the target folder without building the decoder; ``states_to_output`` turns the engine's
per-sample states into the same ``TargetOutput``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from torchspec.draft_models import default_aux_layer_ids
from torchspec.draft_models.aux_layers import validate_aux_layer_ids
from torchspec.draft_models.errors import UserInputError
from torchspec.trainer.config import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = [
    "ServedTarget",
    "TargetHead",
    "TargetModel",
    "TargetOutput",
    "load_causal_lm",
    "states_to_output",
    "unpadded_rows",
]

# What transformers loads weights from: single files, shards with their index.
_WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")


@dataclass
class TargetOutput:
    aux_hidden_states: torch.Tensor  # [B, T, 3 * H]: low, mid, high
    final_hidden: torch.Tensor  # [B, T, H]


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
def _remote_code_hint(path: Path) -> Iterator[None]:
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
        with _remote_code_hint(path):
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=trust_remote_code)
    except SafetensorError:
        for file in sorted(path.glob("*.safetensors")):  # which one: the damaged file raises, naming itself
            with open_safetensors(file):
                pass
        raise
    except OSError as err:  # e.g. a shard the index names is missing
        raise ConfigError(f"{setting} {path}: the weights cannot be loaded ({str(err).splitlines()[0]})") from err
    return model.eval()


class _TargetShape:
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


class TargetModel(_TargetShape):
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

    # --- distribution (applied from outside: torchspec.trainer.parallelize) ----------------------

    def keep_lm_head_weight(self, device: torch.device) -> None:
        """Keep a whole copy of the head's weight on ``device`` for the loss, which reads it at every
        position; taken before the decoder (and a tied embedding table) is sharded."""
        self._lm_head_weight = self.model.get_output_embeddings().weight.detach().to(device)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


# --- the target's head alone, for targets served elsewhere ------------------------------------------

_FINAL_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_norm")


class TargetHead(_TargetShape):
    """The parts of a target the trainer needs when an engine computes its hidden states: the
    config, the final norm (applied here to the last layer's output, which engines hand out before
    the norm), ``lm_head`` and the input embeddings. Read from the folder's safetensors without
    building the decoder: the model is laid out on the meta device only to learn the names and
    the norm's code."""

    def __init__(self, config, final_norm: nn.Module, lm_head_weight: torch.Tensor, embed_tokens_weight: torch.Tensor):
        self.config = config
        self.num_layers = int(config.num_hidden_layers)
        self.final_norm = final_norm.eval().requires_grad_(False)
        self._lm_head_weight = lm_head_weight
        self.embed_tokens_weight = embed_tokens_weight

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self._lm_head_weight

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        trust_remote_code: bool = False,
    ) -> TargetHead:
        from transformers import AutoConfig, AutoModelForCausalLM

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"model.target_model_path {path} is not a Hugging Face model folder (no config.json there); "
                "point it at a local folder written by save_pretrained"
            )
        with _remote_code_hint(path), torch.device("meta"):
            config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        module_names = {id(module): name for name, module in skeleton.named_modules(remove_duplicate=False)}
        decoder = skeleton.base_model
        final_norm = next((getattr(decoder, n) for n in _FINAL_NORM_NAMES if hasattr(decoder, n)), None)
        if final_norm is None:
            raise ConfigError(
                f"cannot find the final norm of {type(decoder).__name__} (model.target_model_path {path})"
            )
        norm_name = module_names[id(final_norm)]
        head_name = module_names[id(skeleton.get_output_embeddings())] + ".weight"
        embed_name = module_names[id(skeleton.get_input_embeddings())] + ".weight"
        norm_names = {f"{norm_name}.{key}": key for key in final_norm.state_dict()}
        tensors = _read_safetensors(path, {head_name, embed_name, *norm_names})
        if head_name not in tensors and getattr(config, "tie_word_embeddings", False):
            head_name = embed_name
        missing = sorted(name for name in (head_name, embed_name, *norm_names) if name not in tensors)
        if missing:
            raise ConfigError(
                f"model.target_model_path {path}: the safetensors weights lack {', '.join(missing)}; "
                "the target folder must hold the complete model"
            )
        final_norm = final_norm.to_empty(device=device)
        final_norm.load_state_dict({key: tensors[name] for name, key in norm_names.items()})
        return cls(
            config,
            final_norm.to(dtype),
            tensors[head_name].to(device=device, dtype=dtype),
            tensors[embed_name].to(dtype=dtype),
        )


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

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> TargetOutput:
        raise NotImplementedError

    def close(self) -> None:
        """Release the engine or files behind the states."""


def _read_safetensors(path: Path, names: set[str]) -> dict[str, torch.Tensor]:
    """The tensors ``names`` of the model folder ``path`` that its safetensors files hold."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files: dict[str, list[str]] = {}
        for name in names:
            if name in weight_map:
                files.setdefault(weight_map[name], []).append(name)
    elif (path / "model.safetensors").is_file():
        files = {"model.safetensors": sorted(names)}
    else:
        raise ConfigError(
            f"model.target_model_path {path} has no model.safetensors (or sharded index); a target served by an "
            "engine is read from safetensors: save it with save_pretrained(safe_serialization=True)"
        )
    tensors = {}
    for file, wanted in files.items():
        with safe_open(str(path / file), framework="pt") as handle:
            present = set(handle.keys())
            tensors.update({name: handle.get_tensor(name) for name in wanted if name in present})
    return tensors


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
