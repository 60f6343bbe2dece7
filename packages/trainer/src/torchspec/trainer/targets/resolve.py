"""A config's names resolved into what they name: the target's folder (a built-in target is built
once, then cached), the dtype, the tokenizer. Every command resolves them this one way."""

from __future__ import annotations

from pathlib import Path

import torch

from torchspec.draft_models.config import DTYPES
from torchspec.trainer.config import ConfigError

__all__ = ["load_tokenizer", "resolve_dtype", "resolve_target_path"]


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def resolve_target_path(path: str) -> Path:
    """``model.target_model_path`` as a folder: a built-in target's (built once, then cached), or ``path``."""
    if path.startswith("builtin:"):
        from torchspec.trainer.commands.default_assets import BUILTIN_TARGETS, ensure_builtin_target

        if path not in BUILTIN_TARGETS:
            raise ConfigError(
                f"model.target_model_path {path} is not a built-in target; use one of {', '.join(BUILTIN_TARGETS)} "
                "or a local Hugging Face folder"
            )
        return ensure_builtin_target(path)
    return Path(path)


def load_tokenizer(path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise ConfigError(
            f"tokenizer folder {path} does not exist; set model.tokenizer_path or model.target_model_path"
        )
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"no usable tokenizer in {path} ({str(err).splitlines()[0]}); set model.tokenizer_path"
        ) from err
