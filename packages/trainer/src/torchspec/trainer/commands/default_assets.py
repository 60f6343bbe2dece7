"""The embedded targets: tiny models and their tokenizer, built locally once.

``hatch run trainer:train`` with no arguments needs a target and a tokenizer without any network.
``ensure_default_target()`` builds them on first use and caches the folder: a byte-level BPE
tokenizer trained on the bundled sample conversations (torchspec-data), and an 8-layer causal LM
trained briefly on those conversations, so that its next-token distributions are those of a (very
small) language model rather than of random weights, which a draft could not learn.

Two are built in (``BUILTIN_TARGETS``): ``builtin:tiny-qwen3``, the default, and
``builtin:tiny-deepseek-v3``, the target MLA drafts are made for, scaled down: DeepSeek-V3's
multi-head latent attention, its first layers dense and the rest mixture-of-experts routed as
DeepSeek-V3 routes (sigmoid scores plus a correction bias), and the router keys DeepSeek-V3's own
``config.json`` carries. Its RMSNorm weights start at ``1 + 0.3 * N(0, 1)`` and its correction bias
at a small random value, so a state taken before a norm differs from one taken after it and the
bias takes part in routing (both are what an engine must reproduce, and 1s and 0s would hide).

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

__all__ = [
    "BUILTIN_TARGETS",
    "TinyTargetRecipe",
    "build_tiny_target",
    "cached_target_folder",
    "default_cache_dir",
    "ensure_builtin_target",
    "ensure_default_target",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TinyTargetRecipe:
    architecture: str = "qwen3"  # qwen3 | deepseek_v3
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
    # Bump when the build code changes what it produces. 2: batches of similar lengths (padding 28% -> ~2%
    # of the tokens), no attention mask (right padding is invisible to causal attention), data loss recorded.
    version: int = 2

    def key(self) -> str:
        fields = asdict(self)
        if fields["architecture"] == "qwen3":  # the key it had before there was a choice: caches stay valid
            del fields["architecture"]
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]


# The built-in target names (``model.target_model_path``) and what they build.
BUILTIN_TARGETS = {
    "builtin:tiny-qwen3": TinyTargetRecipe(),
    # 4 heads of MLA (DeepSeek-V3's kv_lora_rank 512 and 64 rope dims, narrower q/k/v); layers 0-2
    # dense, 3-7 MoE. A step costs about twice the Qwen3 target's, so it trains on half-length
    # sequences for fewer steps: a draft needs a peaked next-token distribution, not a good model.
    "builtin:tiny-deepseek-v3": TinyTargetRecipe(
        architecture="deepseek_v3",
        num_key_value_heads=4,
        intermediate_size=256,
        max_seq_length=256,
        train_steps=120,
    ),
}


def default_cache_dir() -> Path:
    """``$TORCHSPEC_CACHE`` or ``~/.cache/torchspec``, plus ``default_target``."""
    root = os.environ.get("TORCHSPEC_CACHE") or Path.home() / ".cache" / "torchspec"
    return Path(root) / "default_target"


def cached_target_folder(cache_dir: str | os.PathLike, recipe: TinyTargetRecipe) -> Path:
    """Where ``recipe``'s target is cached under ``cache_dir`` (its name carries the recipe's hash)."""
    return Path(cache_dir) / f"tiny-{recipe.architecture.replace('_', '-')}-{recipe.key()}"


def ensure_default_target(cache_dir: str | os.PathLike | None = None, recipe: TinyTargetRecipe | None = None) -> Path:
    """The folder of the built tiny target (model + tokenizer), building it on first use."""
    recipe = recipe or TinyTargetRecipe()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cached_target_folder(cache_dir, recipe)
    if (final / "config.json").is_file():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if (final / "config.json").is_file():  # built by another process while we waited
            return final
        # Holding the lock, any staging folder of this target is a dead build's (killed by a signal,
        # which runs no cleanup).
        for stale in cache_dir.glob(f".{final.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache_dir))
        try:
            build_tiny_target(staging, recipe)
            os.replace(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return final


def ensure_builtin_target(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of the built-in target ``name`` (a key of ``BUILTIN_TARGETS``), built on first use."""
    return ensure_default_target(cache_dir, BUILTIN_TARGETS[name])


def build_tiny_target(output_dir: str | os.PathLike, recipe: TinyTargetRecipe | None = None) -> Path:
    """Build tokenizer and model into ``output_dir`` (no caching, no locking)."""
    from transformers import AutoModelForCausalLM

    from torchspec.data import build_local_tokenizer, build_training_dataset, sample_conversations_path

    recipe = recipe or TinyTargetRecipe()
    output_dir = Path(output_dir)
    started = time.monotonic()
    logger.info(
        "building the default tiny target once (then cached): a tokenizer, then %d training steps of the "
        "model; the progress and an ETA follow (on 2 CPU cores this takes minutes). Folder: %s",
        recipe.train_steps,
        output_dir,
    )
    tokenizer = build_local_tokenizer(output_dir, vocab_size=recipe.vocab_size, template=recipe.chat_template)
    with tempfile.TemporaryDirectory() as data_cache:
        dataset, _ = build_training_dataset(
            sample_conversations_path(), tokenizer, recipe.chat_template, recipe.max_seq_length, cache_dir=data_cache
        )
        sequences = [torch.tensor(ids, dtype=torch.long) for ids in dataset["input_ids"]]

    torch.manual_seed(recipe.seed)
    model = AutoModelForCausalLM.from_config(_model_config(recipe, tokenizer))
    if recipe.architecture == "deepseek_v3":
        _spread_norms_and_router_bias(model)
    final_loss = _train_language_model(model, sequences, tokenizer.pad_token_id, recipe)
    data_loss = _language_model_loss(model, sequences, tokenizer.pad_token_id)
    model.save_pretrained(output_dir)
    if recipe.architecture == "deepseek_v3":
        # DeepSeek-V3's own config.json names its router's kind; transformers 5's DeepseekV3Config
        # (which always routes this way) no longer writes it, and without it vLLM builds a softmax
        # router without the correction bias and refuses the checkpoint (KeyError: ...e_score_correction_bias).
        written = json.loads((output_dir / "config.json").read_text())
        written.update(topk_method="noaux_tc", scoring_func="sigmoid")
        (output_dir / "config.json").write_text(json.dumps(written, indent=2) + "\n")
    (output_dir / "torchspec_build.json").write_text(
        json.dumps(
            {
                "recipe": asdict(recipe),
                "final_train_loss": final_loss,
                "data_loss": data_loss,
                "build_seconds": round(time.monotonic() - started, 1),
            },
            indent=2,
        )
        + "\n"
    )
    logger.info(
        "built the tiny target in %.0fs (LM loss on its conversations %.3f)", time.monotonic() - started, data_loss
    )
    return output_dir


def _model_config(recipe: TinyTargetRecipe, tokenizer):
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        intermediate_size=recipe.intermediate_size,
        max_position_embeddings=recipe.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if recipe.architecture == "qwen3":
        from transformers import Qwen3Config

        return Qwen3Config(**common, head_dim=recipe.head_dim, rope_theta=recipe.rope_theta)
    if recipe.architecture == "deepseek_v3":
        from transformers import DeepseekV3Config

        return DeepseekV3Config(
            **common,
            first_k_dense_replace=3,
            moe_intermediate_size=64,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            n_group=1,
            topk_group=1,
            q_lora_rank=64,
            kv_lora_rank=512,  # vLLM's MLA kernels take DeepSeek-V3's latent width
            qk_nope_head_dim=recipe.head_dim,
            qk_rope_head_dim=64,
            v_head_dim=recipe.head_dim,
            rope_theta=recipe.rope_theta,
            rope_scaling=None,
        )
    raise ValueError(f"unknown tiny target architecture {recipe.architecture!r} (qwen3 | deepseek_v3)")


@torch.no_grad()
def _spread_norms_and_router_bias(model) -> None:
    for module in model.modules():
        if type(module).__name__ == "DeepseekV3RMSNorm":
            module.weight.copy_(1 + 0.3 * torch.randn_like(module.weight))
        elif type(module).__name__ == "DeepseekV3TopkRouter":
            # about the spread of the sigmoid scores: the bias shifts choices without deciding them
            module.e_score_correction_bias.copy_(0.05 * torch.randn_like(module.e_score_correction_bias))


def _length_sorted_batches(
    lengths: list[int], batch_size: int, steps: int, generator: torch.Generator
) -> list[list[int]]:
    """``steps`` batches of sequence indices. Each epoch: the sequences in a random order, stably
    sorted by length (equal lengths mix differently every epoch), cut into batches (a last partial
    batch dropped), the batches shuffled. Every sequence is seen once per epoch, and a batch pads
    its sequences to nearly their own length instead of the longest of a random draw."""
    batches: list[list[int]] = []
    while len(batches) < steps:
        order = sorted(torch.randperm(len(lengths), generator=generator).tolist(), key=lengths.__getitem__)
        epoch = [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
        if not epoch:
            raise ValueError(f"fewer sequences ({len(lengths)}) than one batch ({batch_size})")
        batches += [epoch[i] for i in torch.randperm(len(epoch), generator=generator).tolist()]
    return batches[:steps]


def _padded(sequences: list[torch.Tensor], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and labels (-100 on the padding). No attention mask is needed: with
    right padding and causal attention no real token ever attends to a padded position."""
    input_ids = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True, padding_value=pad_token_id)
    real = torch.nn.utils.rnn.pad_sequence([torch.ones_like(s, dtype=torch.bool) for s in sequences], batch_first=True)
    return input_ids, input_ids.masked_fill(~real, -100)


@torch.no_grad()
def _language_model_loss(model, sequences: list[torch.Tensor], pad_token_id: int, batch_size: int = 32) -> float:
    """Mean next-token loss over every token of ``sequences`` (the build's quality record)."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    total, count = 0.0, 0
    for start in range(0, len(order), batch_size):
        input_ids, labels = _padded([sequences[i] for i in order[start : start + batch_size]], pad_token_id)
        logits = model(input_ids=input_ids).logits[:, :-1].float()
        targets = labels[:, 1:]
        total += float(
            torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"
            )
        )
        count += int((targets != -100).sum())
    return total / max(count, 1)


def _train_language_model(model, sequences: list[torch.Tensor], pad_token_id: int, recipe: TinyTargetRecipe) -> float:
    """Next-token prediction on every token, AdamW with warmup and cosine decay; returns the last loss."""
    generator = torch.Generator().manual_seed(recipe.seed)
    plan = _length_sorted_batches([len(s) for s in sequences], recipe.batch_size, recipe.train_steps, generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(recipe.train_steps // 20, 1)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(recipe.train_steps - warmup, 1)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    loss_value = float("nan")
    progress = _BuildProgress(recipe.train_steps)
    for step, picks in enumerate(plan):
        input_ids, labels = _padded([sequences[i] for i in picks], pad_token_id)
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(loss.detach())
        progress.update(step + 1, loss_value)
    progress.close()
    model.eval()
    return loss_value


class _BuildProgress:
    """The build's LM steps: a tqdm bar (rate, ETA) on a terminal; elsewhere (logs, CI) a few log
    lines with the ETA so far, since the build is otherwise silent for minutes."""

    def __init__(self, total: int):
        from torchspec.trainer.loop.metrics import ProgressBar

        self.total = total
        self.bar = ProgressBar(total, desc="tiny target", unit="step")
        self.started = time.monotonic()
        self.report_at = {min(10, total), *(total * quarter // 4 for quarter in (1, 2, 3))} - {0, total}

    def update(self, step: int, loss: float) -> None:
        if self.bar.enabled:
            self.bar.update(step, f"LM loss {loss:.3f}")
        elif step in self.report_at:
            left = (time.monotonic() - self.started) / step * (self.total - step)
            logger.info("tiny target: step %d/%d, LM loss %.3f, about %.0fs left", step, self.total, loss, left)

    def close(self) -> None:
        self.bar.close()
