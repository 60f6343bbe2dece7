"""Shared steps of the end-to-end tests: train on the embedded default, export, decode."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import torch

from torchspec.converter import export_checkpoint
from torchspec.data import sample_conversations_path
from torchspec.trainer.config import load_config
from torchspec.trainer.loop.run import train

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"llama": REPO / "configs" / "default_llama.yaml", "mla": REPO / "configs" / "default_mla.yaml"}
SAMPLES = str(sample_conversations_path())

# Training steps of the shared runs: enough for a clear gap to an untrained draft (real acceptance
# on the eval split after 80 steps, TTT length 4, measured: llama 2.74, mla 3.12; untrained 1.0).
STEPS = 80

# One run covers two serving features: a train-time pruned vocabulary and non-default aux layers.
PRUNED_ALT_AUX = ("model.draft_vocab_size=600", "model.aux_layer_ids=[1,3,6]")

# Small enough for CI on 2 cores, long enough for the draft to learn the tiny target. Four TTT steps,
# not the default seven: the tests draft at most K=4 tokens, and the draft's step time is most of a
# run's (120 steps: 225 s with seven, 174 s with four; acceptance at step 120 2.84 either way).
FAST = [
    "data.max_seq_length=256",
    "ttt.length=4",
    "metrics.real_acceptance_interval=0",
    "metrics.progress_bar=false",
    "metrics.log_interval=1000",
    "metrics.eval_interval=0",
    "metrics.tensorboard=false",
    "metrics.speculative_eval_prompts=0",
]


def train_default(arch: str, output_dir: Path, steps: int, *overrides: str, step_callback=None):
    config = load_config(
        CONFIGS[arch], [*FAST, f"training.output_dir={output_dir}", f"training.max_steps={steps}", *overrides]
    )
    return train(config, step_callback=step_callback)


def untrained_draft(arch: str, target_dir: Path, out: Path, *overrides: str) -> Path:
    """The draft a run would start from (same config, same seed), exported without training."""
    from torchspec.trainer.loop.draft import build_draft, resolve_draft_config
    from torchspec.trainer.targets.in_process import TargetModel

    config = load_config(CONFIGS[arch], [*FAST, *overrides])
    target = TargetModel.from_pretrained(target_dir)
    torch.manual_seed(config.training.seed)
    build_draft(resolve_draft_config(config.model, target.config), target).save_pretrained(
        out, include_embeddings=False, num_target_layers=target.num_layers
    )
    return out


def free_port() -> int:
    """A localhost port nothing listens on now (for a server or torchrun's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def export(run_dir: Path, out: Path, **kwargs) -> Path:
    return export_checkpoint(run_dir, out, force=True, **kwargs).output


def prune_after_training(run_dir: Path, out: Path, tokenizer: Path, draft_vocab_size: int = 600) -> Path:
    """``converter export --prune-vocab`` on the bundled samples, through the command line users run."""
    from torchspec.converter.cli import main as converter_main

    args = ["export", "--input", str(run_dir), "--output", str(out), "--prune-vocab"]
    args += ["--draft-vocab-size", str(draft_vocab_size), "--dataset-path", SAMPLES]
    args += ["--tokenizer", str(tokenizer), "--chat-template", "qwen"]
    assert converter_main(args) == 0
    assert read_config(out)["draft_vocab_size"] == draft_vocab_size
    return out


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())
