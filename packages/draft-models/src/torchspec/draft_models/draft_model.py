"""``Eagle3DraftModel``: what every EAGLE-3 draft shares, and the serving-format checkpoint I/O.

    hidden = fc(cat(low, mid, high))                       # project_hidden_states
    embeds = embed_tokens(ids)                             # embed_input_ids (frozen, target's table)
    hidden = midlayer(embeds, hidden, ...)                 # backbone: one decoder layer, pre-norm output
    logits = lm_head(norm(hidden))                         # compute_logits, over the draft vocab
    next step reads hidden                                 # next_step_hidden

EAGLE-3.1 options (config flags, as vLLM serves them):

    norm_before_fc:  cat(low, mid, high) -> input_norm(cat(...))               before fc
    fc_norm:         cat(low, mid, high) -> cat(fc_norm.0(low), fc_norm.1(mid), fc_norm.2(high))
                     (after input_norm when both are on)
    norm_output:     the next step reads norm(hidden), the head's input, instead of hidden

A pruned draft vocabulary keeps two buffers: ``d2t`` (draft id ``i`` is target id ``i + d2t[i]``) and
``t2d`` (``t2d[j]`` is True when target token ``j`` is in the draft vocab).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import save_file
from torch import nn

from torchspec.draft_models.config import AutoDraftModelConfig, Eagle3DraftConfig
from torchspec.draft_models.errors import UserInputError
from torchspec.draft_models.layers import Eagle3DecoderLayer, RMSNorm
from torchspec.draft_models.safe_checkpoint import open_safetensors
from torchspec.draft_models.serving_layout import serving_config
from torchspec.draft_models.ttt_attention import DecodeMask, TTTMask

__all__ = ["DraftCheckpointError", "Eagle3DraftModel", "model_class_for", "register_draft_model"]

WEIGHTS_NAME = "model.safetensors"


class DraftCheckpointError(UserInputError):
    """A draft folder whose weights do not match its config; the message names the keys."""


class Eagle3DraftModel(nn.Module):
    config_class: type[Eagle3DraftConfig] = Eagle3DraftConfig

    def __init__(self, config: Eagle3DraftConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        # draft_vocab_size and target_hidden_size are ints once the config's __post_init__ ran.
        target_hidden_size, draft_vocab_size = cast(int, config.target_hidden_size), cast(int, config.draft_vocab_size)
        fc_input_size = 3 * target_hidden_size
        self.input_norm = RMSNorm(fc_input_size, config.rms_norm_eps) if config.norm_before_fc else None
        self.fc_norm = (
            nn.ModuleList(RMSNorm(target_hidden_size, config.rms_norm_eps) for _ in range(3))
            if config.fc_norm
            else None
        )
        self.fc = nn.Linear(fc_input_size, config.hidden_size, bias=False)
        self.midlayer = Eagle3DecoderLayer(
            config.hidden_size, config.intermediate_size, config.rms_norm_eps, self._build_attention(config)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, draft_vocab_size, bias=False)
        if config.is_vocab_pruned:
            self.register_buffer("d2t", torch.zeros(draft_vocab_size, dtype=torch.long))
            self.register_buffer("t2d", torch.zeros(config.vocab_size, dtype=torch.bool))
        else:
            self.d2t = self.t2d = None
        # True once loaded from a folder that holds embed_tokens.weight; vLLM then serves the draft
        # with that table (``has_own_embed_tokens``), otherwise with the target's.
        self.has_own_embedding = False

    def _build_attention(self, config: Eagle3DraftConfig) -> nn.Module:
        raise NotImplementedError

    # --- the four pieces a serving engine (and the TTT loop) calls --------------------------------

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def project_hidden_states(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[B, T, 3 * target_hidden_size]`` (low, mid, high) -> ``[B, T, hidden_size]``."""
        if self.input_norm is not None:
            hidden_states = self.input_norm(hidden_states)
        if self.fc_norm is not None:
            chunks = hidden_states.chunk(len(self.fc_norm), dim=-1)
            hidden_states = torch.cat([norm(chunk) for norm, chunk in zip(self.fc_norm, chunks)], dim=-1)
        return self.fc(hidden_states)

    def backbone(
        self,
        input_embeds: torch.Tensor,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | TTTMask | DecodeMask | None,
        position_ids: torch.Tensor,
        cache_keys: list[torch.Tensor] | None = None,
        cache_values: list[torch.Tensor] | None = None,
        use_cache: bool = True,
    ):
        """One draft step. ``attention_mask`` is a ``[B, T]`` key-padding mask (1 = token), a
        prepared :class:`TTTMask` (training), or a :class:`DecodeMask` (inference over a flat cache).
        Returns ``(pre-norm hidden, cache_keys, cache_values)``."""
        if not isinstance(attention_mask, (TTTMask, DecodeMask)):
            if attention_mask is None:
                attention_mask = torch.ones(input_embeds.shape[:2], dtype=torch.bool, device=input_embeds.device)
            attention_mask = TTTMask(attention_mask)
        return self.midlayer(
            input_embeds, hidden_states, attention_mask, position_ids, cache_keys, cache_values, use_cache
        )

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden_states))

    def next_step_hidden(self, hidden_states: torch.Tensor, normed: torch.Tensor) -> torch.Tensor:
        """The hidden state the next draft step reads, given a step's pre-norm output and its norm:
        the pre-norm one (EAGLE-3), or the normed one the head reads (``norm_output``, EAGLE-3.1)."""
        return normed if self.config.norm_output else hidden_states

    # --- vocabulary and embedding -----------------------------------------------------------------

    def load_embedding(self, weight: torch.Tensor) -> None:
        if tuple(weight.shape) != tuple(self.embed_tokens.weight.shape):
            raise ValueError(
                f"embedding of shape {tuple(weight.shape)} does not fit the draft's "
                f"{tuple(self.embed_tokens.weight.shape)} (vocab_size x hidden_size)"
            )
        with torch.no_grad():
            self.embed_tokens.weight.copy_(weight)

    def freeze_embedding(self) -> None:
        self.embed_tokens.weight.requires_grad_(False)

    def set_vocab_mapping(self, d2t: torch.Tensor, t2d: torch.Tensor) -> None:
        if self.d2t is None:
            raise ValueError("this draft has draft_vocab_size == vocab_size; a vocab mapping needs a pruned config")
        if d2t.shape != self.d2t.shape or t2d.shape != self.t2d.shape:
            raise ValueError(
                f"vocab mapping shapes d2t{tuple(d2t.shape)}/t2d{tuple(t2d.shape)} do not match the draft's "
                f"d2t{tuple(self.d2t.shape)}/t2d{tuple(self.t2d.shape)}"
            )
        self.d2t.copy_(d2t.long())
        self.t2d.copy_(t2d.bool())

    def draft_to_target_ids(self) -> torch.Tensor:
        """Target token id of every draft id."""
        ids = torch.arange(cast(int, self.config.draft_vocab_size), device=self.lm_head.weight.device)
        return ids if self.d2t is None else ids + self.d2t

    # --- serving-format checkpoints ---------------------------------------------------------------

    def save_pretrained(
        self,
        directory: str | os.PathLike,
        include_embeddings: bool = True,
        dtype: torch.dtype | None = None,
        aux_layer_ids: list[int] | None = None,
        num_target_layers: int | None = None,
    ) -> Path:
        """Write the serving folder: ``model.safetensors`` (keys without a ``model.`` prefix) and the
        ``config.json`` export writes too (``serving_layout.serving_config``). The aux layer ids go into
        config.json when known: given, recorded in the config, or the default of a
        ``num_target_layers``-layer target; without them the engines guess (``check`` warns)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, tensor in self.state_dict().items():
            if name == "embed_tokens.weight" and not include_embeddings:
                continue
            if tensor.is_floating_point() and dtype is not None:
                tensor = tensor.to(dtype)
            tensors[name] = tensor.detach().contiguous().cpu()
        save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        serving_dtype = dtype or self.config.declared_dtype or _stored_dtype(tensors.values())
        config = serving_config(
            self.config, serving_dtype, aux_layer_ids=aux_layer_ids, num_target_layers=num_target_layers
        )
        (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return directory

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> Eagle3DraftModel:
        directory = Path(directory)
        config = AutoDraftModelConfig.from_pretrained(directory)
        model_class = model_class_for(config)
        if cls is not Eagle3DraftModel and not issubclass(model_class, cls):
            raise DraftCheckpointError(
                f"{directory}/config.json describes {config.architectures[0]}, not {cls.__name__}; "
                "load it with AutoEagle3DraftModel.from_pretrained"
            )
        with torch.device("meta"):
            model = model_class(config)
        state = read_serving_weights(directory / WEIGHTS_NAME)
        model.load_serving_state_dict(state, source=str(directory / WEIGHTS_NAME), device=device)
        # the declared dtype, else the weights' own, as transformers does (never a class default)
        return model.to(dtype=dtype or config.declared_dtype or _stored_dtype(state.values()))

    def load_serving_state_dict(self, state: dict[str, torch.Tensor], source: str, device="cpu") -> None:
        """Load serving-format weights, accepting ``layers.0.*`` for ``midlayer.*``. The model may
        live on the meta device; missing ``embed_tokens`` stays zero (take it from the target)."""
        state = {_canonical_key(k): v for k, v in state.items()}
        expected = dict(self.state_dict())
        optional = {"embed_tokens.weight"} | ({"t2d"} if self.d2t is not None else set())
        missing = sorted(set(expected) - set(state) - optional)
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise DraftCheckpointError(
                f"{source}: weights do not match config.json"
                + (f"; missing {', '.join(missing)}" if missing else "")
                + (f"; unexpected {', '.join(unexpected)}" if unexpected else "")
            )
        for key, tensor in state.items():
            if tuple(tensor.shape) != tuple(expected[key].shape):
                raise DraftCheckpointError(
                    f"{source}: {key} has shape {tuple(tensor.shape)}, config.json implies {tuple(expected[key].shape)}"
                )
        self.to_empty(device=device)
        self.has_own_embedding = "embed_tokens.weight" in state
        with torch.no_grad():
            for key, value in self.state_dict().items():
                if key in state:
                    value.copy_(state[key].to(value.dtype))
                elif key == "t2d":
                    value.zero_()
                    value[self.draft_to_target_ids()] = True
                else:
                    value.zero_()
        cast(Any, self.midlayer.self_attn).reset_rotary_buffers()  # each draft's attention has one


def _stored_dtype(tensors) -> torch.dtype:
    return next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)


def _canonical_key(key: str) -> str:
    key = key.removeprefix("model.")
    if key.startswith("layers.0."):
        key = "midlayer." + key.removeprefix("layers.0.")
    return key


def read_serving_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise DraftCheckpointError(f"{path} does not exist; a draft folder needs config.json and {WEIGHTS_NAME}")
    with open_safetensors(path) as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


_MODEL_CLASSES: dict[type[Eagle3DraftConfig], type[Eagle3DraftModel]] = {}


def register_draft_model(model_class: type[Eagle3DraftModel]) -> type[Eagle3DraftModel]:
    """Class decorator: the model built for configs of ``model_class.config_class`` (whose
    ``architecture`` names are the registry of names)."""
    _MODEL_CLASSES[model_class.config_class] = model_class
    return model_class


def model_class_for(config: Eagle3DraftConfig) -> type[Eagle3DraftModel]:
    """The model class registered for ``config``'s architecture."""
    AutoDraftModelConfig.config_class_for(config.architectures)  # same error text for bad names
    return _MODEL_CLASSES[type(config)]
