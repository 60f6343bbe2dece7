"""Tokenization throughput of ``build_training_dataset``, and the cache-hit reload time.

    python packages/data/benchmarks/bench_tokenization.py [--conversations 20000] [--template qwen]

Generates multi-turn conversations with the bundled sample generator (another seed), builds the local
tokenizer, then times: tokenizing with 1 and 2 processes (cache bypassed), the same in ``hf`` mode with
1 process, and a second identical call that loads the cached result. Record loading (JSON parsing into
Arrow) is done once beforehand and reported separately.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import random
import tempfile
import time
from pathlib import Path

import datasets

from torchspec.data import build_local_tokenizer, build_training_dataset
from torchspec.data.loading import read_conversation_records

_GENERATOR = Path(__file__).resolve().parents[1] / "scripts" / "generate_sample_conversations.py"


def write_conversations(path: Path, count: int, seed: int) -> None:
    spec = importlib.util.spec_from_file_location("generate_sample_conversations", _GENERATOR)
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as out:
        for _ in range(count):
            out.write(json.dumps({"conversations": generator.conversation(rng)}) + "\n")


def timed(label: str, count: int, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    dataset, stats = build_training_dataset(**kwargs)
    seconds = time.perf_counter() - start
    print(
        f"{label:<34} {seconds:7.2f} s  {count / seconds:9.0f} conversations/s  "
        f"{stats.total_tokens / seconds:11.0f} tokens/s"
    )
    return seconds, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=20_000)
    parser.add_argument("--template", default="qwen")
    parser.add_argument("--max-seq-length", type=int, default=2048)
    args = parser.parse_args()
    datasets.disable_progress_bars()
    logging.getLogger("datasets").setLevel(logging.ERROR)

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        data = scratch / "conversations.jsonl"
        write_conversations(data, args.conversations, seed=7)
        tokenizer = build_local_tokenizer(scratch / "tokenizer", template=args.template)
        cache = scratch / "cache"

        start = time.perf_counter()
        read_conversation_records(data, cache_dir=cache / "records")
        print(f"{args.conversations} conversations, {data.stat().st_size / 1e6:.1f} MB JSONL, template {args.template}")
        print(f"{'load + normalize records (once)':<34} {time.perf_counter() - start:7.2f} s")

        common = dict(path=data, tokenizer=tokenizer, max_seq_length=args.max_seq_length, cache_dir=cache)
        _, stats = timed(
            "tokenize, 1 process", args.conversations, template=args.template, num_proc=1, use_cache=False, **common
        )
        timed(
            "tokenize, 2 processes", args.conversations, template=args.template, num_proc=2, use_cache=False, **common
        )
        timed("tokenize, hf mode, 1 process", args.conversations, template="hf", num_proc=1, use_cache=False, **common)
        start = time.perf_counter()
        build_training_dataset(template=args.template, num_proc=1, **common)
        print(f"{'cache hit (identical call)':<34} {time.perf_counter() - start:7.2f} s")
        print(stats.summary())


if __name__ == "__main__":
    main()
