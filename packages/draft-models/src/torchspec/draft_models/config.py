"""Draft configurations in the serving format (the ``config.json`` SGLang and vLLM read).

Plain dataclasses rather than ``transformers.PretrainedConfig``: the file layout is a contract with
the serving engines, so every key written is chosen here. Keys this package does not know are
kept in ``extra`` and written back unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, cast

import torch

from torchspec.draft_models.aux_layers import CONFIG_KEY as AUX_KEY
from torchspec.draft_models.aux_layers import validate_aux_layer_ids
from torchspec.draft_models.errors import UserInputError
from torchspec.draft_models.rope import normalize_rope_scaling

__all__ = [
    "AutoDraftModelConfig",
    "DTYPES",
    "DeepseekEagle3Config",
    "DraftConfigError",
    "EAGLE3_1_OPTIONS",
    "Eagle3DraftConfig",
    "LlamaEagle3Config",
]


# The dtype names config.json uses (torch_dtype), for the serving dtype and every --dtype option.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DraftConfigError(UserInputError):
    """A draft config that cannot describe a model; the message names the key and the fix."""


# `kv_lora_rank + qk_rope_head_dim` that vLLM's MLA attention backends accept (its MLACommonBackend).
MLA_SERVED_LATENT_WIDTHS = (320, 512, 576)

# Keys that change what an engine serves but that the drafts here do not train, so a folder carrying
# them would be served as another model than the one trained.
_UNTRAINED_FLAGS = {
    "bias": "SGLang and vLLM give o_proj (SGLang also fc) a bias",
    "mlp_bias": "vLLM gives the MLP biases",
    "norm_before_residual": "vLLM normalises the hidden state before the residual",
}

# The EAGLE-3.1 options, as vLLM's llama_eagle3.py / deepseek_eagle3.py read them (all default off).
EAGLE3_1_OPTIONS = ("fc_norm", "norm_before_fc", "norm_output")

# rope_scaling keys any draft may carry when they hold the value every engine assumes anyway.
_NEUTRAL_ROPE_VALUES = {"partial_rotary_factor": 1.0, "truncate": True}
_PARTIAL_ROTARY = "vLLM rotates only that share of each head, SGLang and TorchSpec rotate all of it"
_LLAMA_MSCALE_PAIR = (
    "vLLM's Llama YaRN scales cos/sin by mscale/mscale_all_dim, SGLang's get_rope drops the pair in some releases "
    "(0.1*ln(factor)+1), so no training matches both (a Llama draft generated from a DeepSeek-style target drops it)"
)


@dataclass
class Eagle3DraftConfig:
    """Fields every EAGLE-3 draft has."""

    hidden_size: int
    vocab_size: int
    num_attention_heads: int
    intermediate_size: int
    draft_vocab_size: int | None = None  # defaults to vocab_size (no pruning)
    target_hidden_size: int | None = None  # defaults to hidden_size
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    # The serving dtype; None when config.json declares none (a folder's weights then keep theirs).
    torch_dtype: str | None = None
    num_hidden_layers: int = 1
    tie_word_embeddings: bool = False
    # EAGLE-3.1: an RMSNorm on each aux hidden state (low, mid, high) before fc (`fc_norm.{0,1,2}`) ...
    fc_norm: bool = False
    # ... and/or one RMSNorm over their concatenation, applied first (`input_norm`) ...
    norm_before_fc: bool = False
    # ... and the next draft step reads the normed hidden state (the head's input), not the pre-norm one.
    norm_output: bool = False
    architectures: list[str] = field(default_factory=list)
    model_type: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    # The registry: the name export writes, other names that load as this draft, and the short name
    # a training config uses (`model.draft_architecture`). Model classes are found by config class.
    architecture: ClassVar[str] = ""
    architecture_aliases: ClassVar[tuple[str, ...]] = ()
    kind: ClassVar[str] = ""
    default_model_type: ClassVar[str] = ""
    # rope_scaling type -> the keys this draft's RoPE, vLLM's and SGLang's read the same way.
    servable_rope_keys: ClassVar[dict[str, frozenset[str]]] = {}
    # Why a type or key the engines serve differently is refused (type or key -> reason).
    unservable_rope_types: ClassVar[dict[str, str]] = {}
    unservable_rope_keys: ClassVar[dict[str, str]] = {}

    def __post_init__(self):
        if self.draft_vocab_size is None:
            self.draft_vocab_size = self.vocab_size
        if self.target_hidden_size is None:
            self.target_hidden_size = self.hidden_size
        if not self.architectures:
            self.architectures = [self.architecture]
        if not self.model_type:
            self.model_type = self.default_model_type
        if self.torch_dtype is None and isinstance(self.extra.get("dtype"), str):  # transformers 5's spelling
            self.torch_dtype = self.extra["dtype"]
        try:
            self.rope_scaling = normalize_rope_scaling(self.rope_scaling)
        except ValueError as err:
            raise DraftConfigError(str(err)) from None
        self._validate()

    def _validate(self) -> None:
        for name in ("hidden_size", "vocab_size", "num_attention_heads", "intermediate_size", "draft_vocab_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise DraftConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if cast(int, self.draft_vocab_size) > self.vocab_size:  # an int once __post_init__ ran
            raise DraftConfigError(
                f"draft_vocab_size ({self.draft_vocab_size}) exceeds vocab_size ({self.vocab_size}); "
                "set draft_vocab_size <= vocab_size"
            )
        if self.num_hidden_layers != 1:
            raise DraftConfigError(f"num_hidden_layers must be 1 for an EAGLE-3 draft, got {self.num_hidden_layers}")
        for name in EAGLE3_1_OPTIONS:
            if not isinstance(getattr(self, name), bool):
                raise DraftConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        eagle_config = self.extra.get("eagle_config") or {}
        for key, served_as in _UNTRAINED_FLAGS.items():
            value = self.extra.get(key) or eagle_config.get(key)  # vLLM reads eagle_config.norm_before_fc first
            if value:
                raise DraftConfigError(
                    f"{key}: {value!r} is served ({served_as}) but TorchSpec trains without it; remove it"
                )
        for key, ids in ((AUX_KEY, self.extra.get(AUX_KEY)), (f"eagle_config.{AUX_KEY}", eagle_config.get(AUX_KEY))):
            if ids is not None:
                try:
                    validate_aux_layer_ids(ids, None, source=key)  # the target's depth is not known here
                except UserInputError as err:
                    raise DraftConfigError(str(err)) from None
        if self.extra.get("partial_rotary_factor", 1.0) != 1.0:
            raise DraftConfigError(f"partial_rotary_factor: {_PARTIAL_ROTARY}; remove it")
        self._validate_rope_scaling()

    @classmethod
    def servable_rope_scaling(cls, rope_scaling: dict | None) -> dict | None:
        """``rope_scaling`` (or transformers-5 ``rope_parameters``) without the keys this draft refuses
        because the engines read them differently, for a draft generated from a target's RoPE (a
        Llama draft of a DeepSeek target drops the mscale pair). Refused types stay refused."""
        if not rope_scaling:
            return rope_scaling
        dropped = set(cls.unservable_rope_keys) | {"partial_rotary_factor"}
        return {key: value for key, value in rope_scaling.items() if key not in dropped}

    def _validate_rope_scaling(self) -> None:
        """Refuse RoPE the engines would serve differently from training (or from each other)."""
        if self.rope_scaling is None:
            return
        rope_type = self.rope_scaling["rope_type"]
        if rope_type not in self.servable_rope_keys:
            servable = ", ".join(self.servable_rope_keys) or "none"
            raise DraftConfigError(
                f"rope_scaling type {rope_type!r}: {self.unservable_rope_types.get(rope_type, 'not served alike')}; "
                f"use one of: {servable}, or no rope_scaling"
            )
        for key, value in self.rope_scaling.items():
            if key == "rope_type" or key in self.servable_rope_keys[rope_type]:
                continue
            if key in _NEUTRAL_ROPE_VALUES and value == _NEUTRAL_ROPE_VALUES[key]:
                continue
            if key == "rope_theta":
                if float(value) != float(self.rope_theta):
                    raise DraftConfigError(
                        f"rope_scaling.rope_theta ({value}) differs from rope_theta ({self.rope_theta}): the engines "
                        "use the former, TorchSpec the latter; keep one"
                    )
                continue
            reason = (
                _PARTIAL_ROTARY
                if key == "partial_rotary_factor"
                else self.unservable_rope_keys.get(key, "TorchSpec, SGLang and vLLM do not all read it the same way")
            )
            raise DraftConfigError(f"rope_scaling.{key}: {reason}; remove it")

    def engine_refusals(self) -> list[str]:
        """Why a serving engine would refuse this config although the model here can run it (empty
        when none). Training refuses such a config up front, ``converter check`` reports it."""
        return []

    @property
    def declared_dtype(self) -> torch.dtype | None:
        """The serving dtype ``torch_dtype`` names, or None when the config declares none."""
        return DTYPES.get(str(self.torch_dtype))

    @property
    def is_vocab_pruned(self) -> bool:
        return cast(int, self.draft_vocab_size) < self.vocab_size

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Eagle3DraftConfig:
        values = dict(values)
        # transformers 5 folds rope_theta and the scaling dict into `rope_parameters`.
        rope_parameters = values.pop("rope_parameters", None)
        if rope_parameters and "rope_scaling" not in values:
            rope_parameters = dict(rope_parameters)
            if "rope_theta" in rope_parameters:
                values.setdefault("rope_theta", rope_parameters.pop("rope_theta"))
            values["rope_scaling"] = rope_parameters
        eagle_config = values.get("eagle_config") or {}
        if "norm_before_fc" in eagle_config:  # vLLM reads eagle_config's value before the top-level one
            if values.get("norm_before_fc", eagle_config["norm_before_fc"]) != eagle_config["norm_before_fc"]:
                raise DraftConfigError(
                    f"norm_before_fc is {values['norm_before_fc']!r} but eagle_config.norm_before_fc is "
                    f"{eagle_config['norm_before_fc']!r} (vLLM serves the latter); keep one of them"
                )
            values["norm_before_fc"] = eagle_config["norm_before_fc"]
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in values.items() if k in known}
        kwargs["extra"] = {**values.get("extra", {}), **{k: v for k, v in values.items() if k not in known | {"extra"}}}
        try:
            return cls(**kwargs)
        except TypeError as err:
            missing = [
                f.name
                for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING
                and f.name not in kwargs
            ]
            if not missing:  # a TypeError of the constructor itself: keep it
                raise DraftConfigError(f"draft config {cls.__name__}: {err}") from err
            raise DraftConfigError(f"draft config lacks required keys: {', '.join(missing)}") from None

    def to_dict(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        values.update(self.extra)
        return values

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path


@dataclass
class LlamaEagle3Config(Eagle3DraftConfig):
    """Llama-style draft: grouped-query attention with neox RoPE."""

    num_key_value_heads: int | None = None
    head_dim: int | None = None  # may differ from hidden_size // num_attention_heads (Qwen3)
    attention_bias: bool = False

    architecture: ClassVar[str] = "LlamaForCausalLMEagle3"
    kind: ClassVar[str] = "llama"
    default_model_type: ClassVar[str] = "llama"
    servable_rope_keys: ClassVar[dict[str, frozenset[str]]] = {
        "linear": frozenset({"factor"}),
        "llama3": frozenset({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}),
        "yarn": frozenset({"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "truncate"}),
    }
    unservable_rope_types: ClassVar[dict[str, str]] = {
        "dynamic": "vLLM serves it as plain RoPE below max_position_embeddings, SGLang with a fixed NTK-scaled base",
    }
    unservable_rope_keys: ClassVar[dict[str, str]] = {
        "mscale": _LLAMA_MSCALE_PAIR,
        "mscale_all_dim": _LLAMA_MSCALE_PAIR,
        "attention_factor": "vLLM's Llama YaRN scales cos/sin by it, SGLang's ignores it",
        "attn_factor": "SGLang's YaRN scales cos/sin by it, vLLM's ignores it",
        "extrapolation_factor": "SGLang's YaRN applies it, vLLM's ignores it",
    }

    def _validate(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super()._validate()
        if self.attention_bias:
            raise DraftConfigError(
                "attention_bias: true cannot be served: SGLang's EAGLE-3 layer builds q/k/v without biases (it drops "
                "them) and vLLM's adds an o_proj.bias this draft does not have; set attention_bias to false"
            )
        if self.rope_scaling is not None and self.rope_scaling["rope_type"] == "llama3":
            for key in ("low_freq_factor", "high_freq_factor"):
                if key not in self.rope_scaling:
                    raise DraftConfigError(
                        f"rope_scaling llama3 lacks {key} (vLLM reads it without a default); add it "
                        "(Llama 3.1: low_freq_factor 1.0, high_freq_factor 4.0)"
                    )
        if self.num_attention_heads % self.num_key_value_heads:
            raise DraftConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise DraftConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")


@dataclass
class DeepseekEagle3Config(Eagle3DraftConfig):
    """DeepSeek multi-head latent attention (MLA) draft; fields as in transformers' DeepseekV3Config."""

    q_lora_rank: int = 1536  # query compression; both engines require it (they fuse q_a_proj with kv_a_proj_with_mqa)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    num_key_value_heads: int | None = None  # informational: MLA shares one latent across heads

    architecture: ClassVar[str] = "Eagle3DeepseekV2ForCausalLM"
    # vLLM registers both DeepSeek names. DeepSeekForCausalLMEagle3 was written by older TorchSpec
    # versions and neither engine registers it: such folders still load here, `converter export`
    # writes `architecture` instead and `converter check` reports it.
    architecture_aliases: ClassVar[tuple[str, ...]] = ("Eagle3DeepseekV3ForCausalLM", "DeepSeekForCausalLMEagle3")
    kind: ClassVar[str] = "mla"
    # vLLM rewrites `deepseek_v3` configs into its MTP draft; `deepseek_v2` is left alone by both engines.
    default_model_type: ClassVar[str] = "deepseek_v2"
    # Both engines turn any MLA rope_scaling into DeepSeek YaRN (`deepseek_yarn`).
    servable_rope_keys: ClassVar[dict[str, frozenset[str]]] = {
        "yarn": frozenset(
            {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"}
        ),
    }
    unservable_rope_types: ClassVar[dict[str, str]] = dict.fromkeys(
        ("linear", "dynamic", "llama3"),
        "SGLang and vLLM run every MLA draft's rope_scaling as DeepSeek YaRN, so it would be served with other "
        "frequencies than trained",
    )
    unservable_rope_keys: ClassVar[dict[str, str]] = {
        "attention_factor": "the engines' DeepSeek YaRN ignores it (and vLLM drops the softmax mscale when it is 1.0)",
        "attn_factor": "SGLang's DeepSeek YaRN scales cos/sin by it, vLLM's ignores it",
        "extrapolation_factor": "SGLang's DeepSeek YaRN applies it, vLLM's ignores it",
        "truncate": "the engines' DeepSeek YaRN always truncates the correction range",
    }

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_width(self) -> int:
        """Width of the cached latent per token (``kv_lora_rank + qk_rope_head_dim``): what vLLM's MLA
        attention calls its head size."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def engine_refusals(self) -> list[str]:
        refusals = []
        if self.latent_width not in MLA_SERVED_LATENT_WIDTHS:
            refusals.append(
                f"kv_lora_rank + qk_rope_head_dim = {self.latent_width}: vLLM's MLA attention serves latent widths "
                f"{', '.join(map(str, MLA_SERVED_LATENT_WIDTHS))} only (its CPU kernel and FlashMLA 576 only); "
                "use kv_lora_rank 512 and qk_rope_head_dim 64 as DeepSeek-V3 does"
            )
        if self.norm_before_fc:
            refusals.append(
                "norm_before_fc: true: vLLM's DeepSeek EAGLE-3 draft (0.32) has no input_norm and refuses its weight; "
                "use fc_norm (one norm per aux hidden state) for an MLA draft"
            )
        return refusals

    def _validate(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super()._validate()
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise DraftConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.q_lora_rank is None:
            raise DraftConfigError(
                "q_lora_rank: null cannot be served: vLLM's and SGLang's DeepSeek EAGLE-3 layers fuse q_a_proj with "
                "kv_a_proj_with_mqa and have no uncompressed q_proj; set q_lora_rank (DeepSeek-V3: 1536 = 3 x "
                "kv_lora_rank)"
            )
        if not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0:
            raise DraftConfigError(f"q_lora_rank must be a positive integer, got {self.q_lora_rank!r}")
        if self.qk_rope_head_dim % 2:
            raise DraftConfigError(f"qk_rope_head_dim must be even for RoPE, got {self.qk_rope_head_dim}")


DRAFT_CONFIG_CLASSES: tuple[type[Eagle3DraftConfig], ...] = (LlamaEagle3Config, DeepseekEagle3Config)
_CONFIG_CLASSES: dict[str, type[Eagle3DraftConfig]] = {
    name: config_class
    for config_class in DRAFT_CONFIG_CLASSES
    for name in (config_class.architecture, *config_class.architecture_aliases)
}


class AutoDraftModelConfig:
    """Picks the config class from the ``architectures`` entry."""

    supported_architectures = tuple(_CONFIG_CLASSES)

    @staticmethod
    def config_class_for(architectures: Any, source: str = "config") -> type[Eagle3DraftConfig]:
        supported = ", ".join(_CONFIG_CLASSES)
        if isinstance(architectures, str):
            architectures = [architectures]
        if not architectures:
            raise DraftConfigError(f"{source}: 'architectures' is missing or empty; set it to one of: {supported}")
        if len(architectures) != 1:
            raise DraftConfigError(
                f"{source}: 'architectures' lists {len(architectures)} entries {architectures}; "
                f"a draft has exactly one of: {supported}"
            )
        name = architectures[0]
        if name not in _CONFIG_CLASSES:
            raise DraftConfigError(f"{source}: unknown draft architecture {name!r}; supported: {supported}")
        return _CONFIG_CLASSES[name]

    @staticmethod
    def config_class_for_kind(kind: str) -> type[Eagle3DraftConfig]:
        """The config class of a short architecture name (``llama``, ``mla``)."""
        for config_class in DRAFT_CONFIG_CLASSES:
            if config_class.kind == kind:
                return config_class
        raise DraftConfigError(
            f"unknown draft kind {kind!r}; use one of: {', '.join(c.kind for c in DRAFT_CONFIG_CLASSES)}"
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> Eagle3DraftConfig:
        config_class = cls.config_class_for(values.get("architectures"), source)
        try:
            return config_class.from_dict(values)
        except DraftConfigError as err:
            raise DraftConfigError(f"{source}: {err}") from None

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Eagle3DraftConfig:
        path = Path(path)
        if not path.is_file():
            raise DraftConfigError(f"draft config file {path} does not exist")
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise DraftConfigError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
        if not isinstance(values, dict):
            raise DraftConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(values, source=str(path))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> Eagle3DraftConfig:
        directory = Path(directory)
        if directory.is_file():
            return cls.from_file(directory)
        return cls.from_file(directory / "config.json")
