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
from typing import Any, ClassVar

from torchspec.draft_models.rope import normalize_rope_scaling

__all__ = [
    "AutoDraftModelConfig",
    "DeepseekEagle3Config",
    "DraftConfigError",
    "Eagle3DraftConfig",
    "LlamaEagle3Config",
]


class DraftConfigError(ValueError):
    """A draft config that cannot describe a model; the message names the key and the fix."""


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
    torch_dtype: str = "bfloat16"
    num_hidden_layers: int = 1
    tie_word_embeddings: bool = False
    architectures: list[str] = field(default_factory=list)
    model_type: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    architecture: ClassVar[str] = ""
    default_model_type: ClassVar[str] = ""

    def __post_init__(self):
        if self.draft_vocab_size is None:
            self.draft_vocab_size = self.vocab_size
        if self.target_hidden_size is None:
            self.target_hidden_size = self.hidden_size
        if not self.architectures:
            self.architectures = [self.architecture]
        if not self.model_type:
            self.model_type = self.default_model_type
        try:
            self.rope_scaling = normalize_rope_scaling(self.rope_scaling)
        except ValueError as err:
            raise DraftConfigError(str(err)) from None
        self._validate()

    def _validate(self) -> None:
        for name in ("hidden_size", "vocab_size", "num_attention_heads", "intermediate_size", "draft_vocab_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise DraftConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.draft_vocab_size > self.vocab_size:
            raise DraftConfigError(
                f"draft_vocab_size ({self.draft_vocab_size}) exceeds vocab_size ({self.vocab_size}); "
                "set draft_vocab_size <= vocab_size"
            )
        if self.num_hidden_layers != 1:
            raise DraftConfigError(f"num_hidden_layers must be 1 for an EAGLE-3 draft, got {self.num_hidden_layers}")

    @property
    def is_vocab_pruned(self) -> bool:
        return self.draft_vocab_size < self.vocab_size

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
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in values.items() if k in known}
        kwargs["extra"] = {**values.get("extra", {}), **{k: v for k, v in values.items() if k not in known | {"extra"}}}
        try:
            return cls(**kwargs)
        except TypeError as err:
            missing = [
                f.name
                for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in kwargs
            ]
            raise DraftConfigError(f"draft config lacks required keys: {', '.join(missing) or err}") from None

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
    default_model_type: ClassVar[str] = "llama"

    def _validate(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super()._validate()
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

    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    num_key_value_heads: int | None = None  # informational: MLA shares one latent across heads

    architecture: ClassVar[str] = "Eagle3DeepseekV2ForCausalLM"
    # vLLM rewrites `deepseek_v3` configs into its MTP draft; `deepseek_v2` is left alone by both engines.
    default_model_type: ClassVar[str] = "deepseek_v2"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def _validate(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super()._validate()
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise DraftConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise DraftConfigError(f"q_lora_rank must be positive or null, got {self.q_lora_rank!r}")
        if self.qk_rope_head_dim % 2:
            raise DraftConfigError(f"qk_rope_head_dim must be even for RoPE, got {self.qk_rope_head_dim}")


_CONFIG_CLASSES: dict[str, type[Eagle3DraftConfig]] = {
    "LlamaForCausalLMEagle3": LlamaEagle3Config,
    "Eagle3DeepseekV2ForCausalLM": DeepseekEagle3Config,
    "Eagle3DeepseekV3ForCausalLM": DeepseekEagle3Config,
    "DeepSeekForCausalLMEagle3": DeepseekEagle3Config,
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
