"""The part of a target the trainer holds when an engine or a dump computes the hidden states: the
config, the final norm, ``lm_head`` and the embedding table, read from the target folder without
building the decoder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from torchspec.trainer.config import ConfigError
from torchspec.trainer.targets.contract import TargetShape
from torchspec.trainer.targets.in_process import FINAL_NORM_NAMES, remote_code_hint

__all__ = ["TargetHead"]


class TargetHead(TargetShape):
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
        with remote_code_hint(path), torch.device("meta"):
            config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        module_names = {id(module): name for name, module in skeleton.named_modules(remove_duplicate=False)}
        decoder = skeleton.base_model
        final_norm = next((getattr(decoder, n) for n in FINAL_NORM_NAMES if hasattr(decoder, n)), None)
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
