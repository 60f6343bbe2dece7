"""The embedded default target: a tiny Qwen3-style model and its tokenizer, built locally once.

``hatch run trainer:train`` with no arguments needs a target and a tokenizer without any network.
``ensure_default_target()`` builds them on first use and caches the folder: a byte-level BPE
tokenizer trained on the bundled sample conversations (torchspec-data), and an 8-layer Qwen3-style
causal LM trained briefly on those conversations, so that its next-token distributions are those
of a (very small) language model rather than of random weights, which a draft could not learn.

The cache folder's name carries a hash of the recipe, so a changed recipe builds a new one. The
build runs in a temporary folder renamed into place when done, under a file lock, so concurrent
runs (several ranks, several test processes) build once and never see a half-written target.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = ["TinyTargetRecipe", "build_tiny_target", "default_cache_dir", "ensure_default_target"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TinyTargetRecipe:
    vocab_size: int = 2048
    hidden_size: int = 128
    num_hidden_layers: int = 8
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 384
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    chat_template: str = "qwen"
    max_seq_length: int = 512
    train_steps: int = 200
    batch_size: int = 16
    learning_rate: float = 3e-3
    seed: int = 0
    version: int = 1  # bump when the build code changes what it produces

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


def default_cache_dir() -> Path:
    """``$TORCHSPEC_CACHE`` or ``~/.cache/torchspec``, plus ``default_target``."""
    root = os.environ.get("TORCHSPEC_CACHE") or Path.home() / ".cache" / "torchspec"
    return Path(root) / "default_target"


def ensure_default_target(cache_dir: str | os.PathLike | None = None, recipe: TinyTargetRecipe | None = None) -> Path:
    """The folder of the built tiny target (model + tokenizer), building it on first use."""
    recipe = recipe or TinyTargetRecipe()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache_dir / f"tiny-qwen3-{recipe.key()}"
    if (final / "config.json").is_file():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if (final / "config.json").is_file():  # built by another process while we waited
            return final
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache_dir))
        try:
            build_tiny_target(staging, recipe)
            os.replace(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return final


def build_tiny_target(output_dir: str | os.PathLike, recipe: TinyTargetRecipe | None = None) -> Path:
    """Build tokenizer and model into ``output_dir`` (no caching, no locking)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from torchspec.data import build_local_tokenizer, build_training_dataset, sample_conversations_path

    recipe = recipe or TinyTargetRecipe()
    output_dir = Path(output_dir)
    started = time.monotonic()
    logger.info("building the default tiny target in %s (once; about a minute on 2 CPU cores)", output_dir)
    tokenizer = build_local_tokenizer(output_dir, vocab_size=recipe.vocab_size, template=recipe.chat_template)
    with tempfile.TemporaryDirectory() as data_cache:
        dataset, _ = build_training_dataset(
            sample_conversations_path(), tokenizer, recipe.chat_template, recipe.max_seq_length, cache_dir=data_cache
        )
        sequences = [torch.tensor(ids, dtype=torch.long) for ids in dataset["input_ids"]]

    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        head_dim=recipe.head_dim,
        intermediate_size=recipe.intermediate_size,
        max_position_embeddings=recipe.max_position_embeddings,
        rope_theta=recipe.rope_theta,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(recipe.seed)
    model = Qwen3ForCausalLM(config)
    final_loss = _train_language_model(model, sequences, tokenizer.pad_token_id, recipe)
    model.save_pretrained(output_dir)
    (output_dir / "torchspec_build.json").write_text(
        json.dumps({"recipe": asdict(recipe), "final_train_loss": final_loss,
                    "build_seconds": round(time.monotonic() - started, 1)}, indent=2) + "\n"
    )
    logger.info("built the tiny target in %.0fs (final LM loss %.3f)", time.monotonic() - started, final_loss)
    return output_dir


def _train_language_model(model, sequences: list[torch.Tensor], pad_token_id: int, recipe: TinyTargetRecipe) -> float:
    """Next-token prediction on every token, AdamW with warmup and cosine decay; returns the last loss."""
    generator = torch.Generator().manual_seed(recipe.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(recipe.train_steps // 20, 1)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(recipe.train_steps - warmup, 1)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    loss_value = float("nan")
    for _ in range(recipe.train_steps):
        picks = torch.randint(len(sequences), (recipe.batch_size,), generator=generator).tolist()
        batch = torch.nn.utils.rnn.pad_sequence([sequences[i] for i in picks], batch_first=True, padding_value=pad_token_id)
        attention_mask = torch.nn.utils.rnn.pad_sequence(
            [torch.ones_like(sequences[i]) for i in picks], batch_first=True, padding_value=0
        )
        labels = batch.masked_fill(attention_mask == 0, -100)
        loss = model(input_ids=batch, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(loss.detach())
    model.eval()
    return loss_value
