"""``hatch run trainer:bench``: acceptance length of a draft, or of every checkpoint of a run, on one
or more prompt sets, with a bootstrap confidence interval over prompts, as JSON and pictures.

A number without its protocol is noise (published figures differ 2x by protocol alone), so every
output states it in full:

* judge: ``vllm`` (vLLM serves the target with the draft; the default where vLLM is installed) or
  ``evaluator`` (the in-process speculative decoder of ``trainer:evaluate``); on what both can run
  they count the same rounds and accepted tokens (greedy, float32);
* draft tokens per round (``--num-draft-tokens``), drafted as a chain (no tree);
* temperature and top-p (``--temperature``, ``--top-p``; 0 = greedy) and, at temperature > 0, how
  the draft picks its tokens (``--draft-sampling``: ``greedy``, vLLM's default, proposes the argmax;
  ``probabilistic`` samples); the target's tokens follow the rejection-sampling rule either way;
* new tokens per turn (``--max-new-tokens``), stopping at the tokenizer's EOS unless ``--ignore-eos``;
* batch: prompts the engine decodes at once (``--batch``, default all; the evaluator decodes one at
  a time); number of prompts per set; seed (sampling and the bootstrap).

Prompt sets (``--prompts FILE``, repeatable; default the run's eval split, the samples it held out,
never its training prompts): MT-Bench's
``question.jsonl`` layout (``question_id``, ``category``, ``turns``: the user's messages), run as
MT-Bench runs it (turn 2's prompt is the chat with turn 1's generated answer in it; acceptance counts
every turn), or the project's conversation datasets (each conversation up to its last assistant
turn, as ``trainer:evaluate`` reads them). The layout is told from the keys of the first record.

Reported, per set and per category: acceptance length (accepted draft tokens + 1 bonus token per
verification round, the ratio of sums over all rounds: vLLM's convention), its percentile bootstrap
interval over prompts (``torchspec.trainer.loop.acceptance_stats``), and per-position acceptance.
Written: ``bench.json`` (``--output``; default in the ``--draft`` folder or the ``--run`` folder) and,
beside it, ``bench_categories.png``, ``bench_positions.png`` and, for a run, ``bench_steps.png``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torchspec.draft_models.errors import UserInputError, cli_main
from torchspec.trainer.loop.acceptance_stats import (
    DEFAULT_RESAMPLES,
    AcceptanceSummary,
    Interval,
    ratio_interval,
    summarize,
)

__all__ = [
    "MT_BENCH_KEYS",
    "BenchPrompt",
    "BenchResult",
    "PromptSet",
    "Protocol",
    "SetResult",
    "build_parser",
    "draft_folder_from_checkpoint",
    "held_out_prompt_set",
    "main",
    "read_prompt_set",
    "render_pictures",
    "run_bench",
    "run_turns",
]

MT_BENCH_KEYS = ("question_id", "category", "turns")
JUDGES = ("vllm", "evaluator")


@dataclass(frozen=True)
class Protocol:
    """Everything the measured acceptance depends on besides the draft, the target and the prompts."""

    judge: str
    num_draft_tokens: int = 3
    temperature: float = 0.0
    top_p: float = 1.0
    draft_sampling: str = "greedy"
    max_new_tokens: int = 256
    stop_at_eos: bool = True
    batch: int | None = None  # prompts decoded at once; None: all (vllm), the evaluator runs 1
    num_prompts: int = 80  # at most, per prompt set
    seed: int = 0
    dtype: str = "float32"
    confidence: float = 0.95
    resamples: int = DEFAULT_RESAMPLES
    chain: bool = True  # drafts are chains (both judges); trees are not measured here

    def describe(self, num_prompts: int | None = None) -> str:
        """One line naming every setting."""
        sampling = "greedy" if self.temperature == 0 else f"draft {self.draft_sampling}"
        batch = "1 (the evaluator decodes one prompt at a time)" if self.judge == "evaluator" else self.batch or "all"
        prompts = num_prompts if num_prompts is not None else f"<= {self.num_prompts} per set"
        return (
            f"judge {self.judge}; {self.num_draft_tokens} draft tokens, chain; temperature {self.temperature:g} "
            f"({sampling}), top-p {self.top_p:g}; max {self.max_new_tokens} new tokens per turn, "
            f"{'stop at EOS' if self.stop_at_eos else 'EOS ignored'}; batch {batch}; prompts {prompts}; "
            f"seed {self.seed}; {self.dtype}; {self.confidence:.0%} percentile bootstrap over prompts, "
            f"{self.resamples} resamples"
        )

    def short(self) -> str:
        """The protocol in a picture's title."""
        sampling = "greedy" if self.temperature == 0 else f"T={self.temperature:g}, top-p={self.top_p:g}"
        return (
            f"{self.judge} judge, K={self.num_draft_tokens} chain, {sampling}, "
            f"{self.max_new_tokens} new tokens/turn, batch {1 if self.judge == 'evaluator' else self.batch or 'all'}, "
            f"seed {self.seed}"
        )


# --- prompt sets ---------------------------------------------------------------------------------


@dataclass
class BenchPrompt:
    prompt_id: str
    category: str | None = None
    turns: list[str] | None = None  # MT-Bench: the user's messages, asked one after the other
    token_ids: list[int] | None = None  # a conversation set: the rendered context, one turn

    @property
    def num_turns(self) -> int:
        return len(self.turns) if self.turns is not None else 1


@dataclass
class PromptSet:
    name: str
    path: str
    layout: str  # "mt-bench" or "conversations"
    prompts: list[BenchPrompt]

    @property
    def has_categories(self) -> bool:
        return any(p.category is not None for p in self.prompts)


def _first_record(path: Path) -> tuple[dict | None, str]:
    """The first JSON record of a .jsonl/.json file (None for other sources), and where it is."""
    if path.suffix not in (".jsonl", ".json") or not path.is_file():
        return None, str(path)
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                if path.suffix == ".json":
                    break  # a JSON array over several lines
                raise UserInputError(f"--prompts {path}:{number}: not a JSON line; fix or delete it") from None
            if isinstance(value, list):
                value = value[0] if value else None
            return (value if isinstance(value, dict) else None), f"{path}:{number}"
    if path.suffix == ".json":
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise UserInputError(f"--prompts {path}: invalid JSON ({err.msg} at line {err.lineno})") from None
        if isinstance(document, list) and document and isinstance(document[0], dict):
            return document[0], f"{path}[0]"
    return None, str(path)


def _mt_bench_records(path: Path) -> list[tuple[str, dict]]:
    if path.suffix == ".json":
        document = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(document, list):
            return [(f"{path}[{i}]", r) for i, r in enumerate(document)]
    records = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    records.append((f"{path}:{number}", json.loads(line)))
                except json.JSONDecodeError:
                    raise UserInputError(f"--prompts {path}:{number}: not a JSON line; fix or delete it") from None
    return records


def _mt_bench_prompt(where: str, record: Any) -> BenchPrompt:
    if not isinstance(record, dict) or not all(key in record for key in ("question_id", "turns")):
        raise UserInputError(f"--prompts {where}: an MT-Bench record needs {', '.join(MT_BENCH_KEYS)}")
    turns = record["turns"]
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t for t in turns):
        raise UserInputError(f"--prompts {where}: 'turns' must be a non-empty list of the user's messages (strings)")
    category = record.get("category")
    return BenchPrompt(str(record["question_id"]), None if category is None else str(category), turns=list(turns))


def read_prompt_set(path: str, tokenizer, prompt_key: str = "conversations", limit: int = 80) -> PromptSet:
    """The first ``limit`` prompts of ``path``: MT-Bench's ``question.jsonl`` layout, or conversations."""
    from torchspec.trainer.commands.evaluate import prompts_from_conversations

    source = Path(path)
    if not str(path).startswith("hf://") and not source.exists():
        raise UserInputError(f"--prompts {path}: no such file or directory")
    record, where = _first_record(source)
    name = source.stem if source.stem != "question" else source.parent.name or source.stem
    if record is not None and "turns" in record:
        prompts = [_mt_bench_prompt(w, r) for w, r in _mt_bench_records(source)[:limit]]
        return PromptSet(name, str(path), "mt-bench", prompts)
    aliases = {prompt_key, "conversations", "messages"}
    if record is not None and not aliases & set(record):
        raise UserInputError(
            f"--prompts {path}: unknown layout (keys of {where}: {', '.join(sorted(record)) or 'none'}); expected "
            f"MT-Bench's question.jsonl ({', '.join(MT_BENCH_KEYS)}) or conversations (a '{prompt_key}' list of "
            "messages; --prompt-key names another column)"
        )
    ids = prompts_from_conversations(str(path), tokenizer, prompt_key, limit)
    return PromptSet(name, str(path), "conversations", [BenchPrompt(str(i), token_ids=p) for i, p in enumerate(ids)])


def held_out_prompt_set(run_dir: Path, limit: int = 80) -> PromptSet:
    """The first ``limit`` prompts of the samples run ``run_dir`` held out (as ``trainer:evaluate``
    reads them without --data)."""
    from torchspec.trainer.commands.evaluate import eval_split_prompts

    prompts, source = eval_split_prompts(run_dir, limit)
    return PromptSet(
        "eval split", source, "conversations", [BenchPrompt(str(i), token_ids=p) for i, p in enumerate(prompts)]
    )


# --- decoding ------------------------------------------------------------------------------------

# One generation: (generated token ids, accepted draft tokens of each verification round).
Generation = tuple[list[int], list[int]]
Generate = Callable[[list[list[int]]], list[Generation]]


@dataclass
class PromptOutcome:
    prompt_id: str
    category: str | None
    accepted: list[int] = field(default_factory=list)  # per verification round, all turns
    generated_tokens: int = 0
    turn_lengths: list[int] = field(default_factory=list)  # prompt tokens of each turn


def run_turns(prompt_set: PromptSet, tokenizer, generate: Generate) -> list[PromptOutcome]:
    """Decode every turn of every prompt: turn ``t`` of all prompts that have it in one call of
    ``generate``; an MT-Bench prompt's turn ``t + 1`` is the chat with the answers generated so far."""
    from torchspec.trainer.commands.evaluate import chat_prompt_ids

    outcomes = [PromptOutcome(p.prompt_id, p.category) for p in prompt_set.prompts]
    chats: list[list[dict]] = [[] for _ in prompt_set.prompts]
    for turn in range(max((p.num_turns for p in prompt_set.prompts), default=0)):
        active = [i for i, p in enumerate(prompt_set.prompts) if turn < p.num_turns]
        inputs = []
        for i in active:
            prompt = prompt_set.prompts[i]
            if prompt.turns is None:
                inputs.append(list(prompt.token_ids or []))
            else:
                chats[i].append({"role": "user", "content": prompt.turns[turn]})
                inputs.append(chat_prompt_ids(tokenizer, chats[i]))
        for i, ids, (tokens, accepted) in zip(active, inputs, generate(inputs), strict=True):
            outcomes[i].accepted += accepted
            outcomes[i].generated_tokens += len(tokens)
            outcomes[i].turn_lengths.append(len(ids))
            if prompt_set.prompts[i].turns is not None:
                answer = tokenizer.decode(tokens, skip_special_tokens=True)
                chats[i].append({"role": "assistant", "content": answer})
    return outcomes


def _evaluator_generate(draft, target, protocol: Protocol, eos_token_id: int | None) -> Generate:
    from torchspec.draft_models import SpeculativeGenerator

    generator = SpeculativeGenerator(
        draft,
        target,
        num_draft_tokens=protocol.num_draft_tokens,
        temperature=protocol.temperature,
        seed=protocol.seed,
        top_p=protocol.top_p,
        draft_sampling=protocol.draft_sampling,
    )

    def generate(prompts: list[list[int]]) -> list[Generation]:
        results = [generator.generate(p, protocol.max_new_tokens, eos_token_id) for p in prompts]
        return [(r.tokens, r.accepted_per_round) for r in results]

    return generate


def _vllm_generate(worker, protocol: Protocol, eos_token_id: int | None) -> Generate:
    from torchspec.trainer.engine.launch import EngineError

    def generate(prompts: list[list[int]]) -> list[Generation]:
        reply = worker.reply(
            worker.send(
                "generate",
                prompts=prompts,
                max_new_tokens=protocol.max_new_tokens,
                temperature=protocol.temperature,
                top_p=protocol.top_p,
                seed=protocol.seed,
                ignore_eos=True,  # EOS is the tokenizer's (below), the same token the evaluator stops at
                stop_token_ids=[eos_token_id] if eos_token_id is not None else [],
                spec_stats=True,
            )
        )
        if "accepted_histograms" not in reply:
            raise EngineError(
                f"vLLM {worker.vllm_version} returned no per-request speculative-decoding counts "
                "(per_request_spec_decode_metrics, vLLM >= 0.32); bench needs them for the interval over prompts"
            )
        # A prompt's rounds from its histogram (histogram[j]: rounds that accepted j drafts).
        rounds = [[j for j, count in enumerate(h) for _ in range(count)] for h in reply["accepted_histograms"]]
        return list(zip(reply["outputs"], rounds, strict=True))

    return generate


# --- results -------------------------------------------------------------------------------------


@dataclass
class SetResult:
    name: str
    path: str
    layout: str
    summary: AcceptanceSummary
    position_intervals: list[Interval]
    categories: dict[str, AcceptanceSummary]
    outcomes: list[PromptOutcome]

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "path": self.path,
            "layout": self.layout,
            "num_prompts": len(self.outcomes),
            "num_turns": sum(len(o.turn_lengths) for o in self.outcomes),
            "generated_tokens": sum(o.generated_tokens for o in self.outcomes),
            **self.summary.to_dict(),
            "position_intervals": [asdict(i) for i in self.position_intervals],
            "categories": {name: s.to_dict() for name, s in self.categories.items()},
            "prompts": [
                {
                    "id": o.prompt_id,
                    "category": o.category,
                    "rounds": len(o.accepted),
                    "accepted_tokens": sum(o.accepted),
                    "generated_tokens": o.generated_tokens,
                }
                for o in self.outcomes
            ],
        }


@dataclass
class BenchResult:
    draft: str
    step: int | None
    sets: list[SetResult]

    def to_dict(self) -> dict:
        return {"draft": self.draft, "step": self.step, "sets": [s.to_dict() for s in self.sets]}


def _summarize_set(prompt_set: PromptSet, outcomes: list[PromptOutcome], protocol: Protocol) -> SetResult:
    def stats(subset: list[PromptOutcome]) -> AcceptanceSummary:
        return summarize(
            [o.accepted for o in subset],
            protocol.num_draft_tokens,
            protocol.confidence,
            protocol.resamples,
            protocol.seed,
        )

    positions = [
        ratio_interval(
            [sum(a >= i for a in o.accepted) for o in outcomes],
            [len(o.accepted) for o in outcomes],
            protocol.confidence,
            protocol.resamples,
            protocol.seed,
        )
        for i in range(1, protocol.num_draft_tokens + 1)
    ]
    names = sorted({o.category for o in outcomes if o.category is not None})
    categories = {name: stats([o for o in outcomes if o.category == name]) for name in names}
    return SetResult(
        prompt_set.name, prompt_set.path, prompt_set.layout, stats(outcomes), positions, categories, outcomes
    )


def _interval_text(interval: Interval) -> str:
    if math.isnan(interval.low):
        return "[n/a]"
    return f"[{interval.low:.3f}, {interval.high:.3f}]"


def _report_lines(result: BenchResult) -> list[str]:
    lines = [f"draft {result.draft}" + (f" (step {result.step})" if result.step is not None else "")]
    for s in result.sets:
        summary = s.summary
        turns = sum(len(o.turn_lengths) for o in s.outcomes)
        lines.append(f"  set {s.name} ({s.layout}, {summary.num_prompts} prompts, {turns} turns; {s.path})")
        lines.append(
            f"    acceptance length  {summary.acceptance_length:.3f}  {summary.interval.confidence:.0%} CI "
            f"{_interval_text(summary.interval)}  ({summary.num_rounds} rounds, {summary.num_accepted_tokens} "
            "accepted draft tokens)"
        )
        lines.append(
            "    per position       "
            + "  ".join(
                f"{i + 1}: {share:.2f} {_interval_text(iv)}"
                for i, (share, iv) in enumerate(zip(summary.position_acceptance, s.position_intervals))
            )
        )
        if s.categories:
            width = max(len(name) for name in s.categories)
            lines.append(f"    {'category'.ljust(width)}  prompts  acceptance  CI")
            for name, c in s.categories.items():
                lines.append(
                    f"    {name.ljust(width)}  {c.num_prompts:7d}  {c.acceptance_length:10.3f}  "
                    f"{_interval_text(c.interval)}"
                )
    return lines


# --- the drafts: a folder, or every checkpoint of a run ------------------------------------------


def draft_folder_from_checkpoint(checkpoint: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """A training checkpoint as a float32 serving folder (what ``converter export`` writes, in the
    weights' own precision), for the judges that load folders."""
    import torch

    from torchspec.draft_models import AutoEagle3DraftModel, TrainingCheckpoint

    opened = TrainingCheckpoint.open(checkpoint)
    model = AutoEagle3DraftModel.from_config(opened.config)
    state = {name: opened.load_tensor(name) for name in opened.weight_names()}
    model.load_state_dict(state)
    own_embedding = opened.config.hidden_size != opened.config.target_hidden_size  # as export decides
    return model.save_pretrained(
        folder,
        include_embeddings=own_embedding,
        dtype=torch.float32,
        aux_layer_ids=opened.aux_layer_ids,
        num_target_layers=opened.num_target_layers,
    )


def _judge_default() -> str:
    from torchspec.trainer.engine.launch import vllm_available

    configured = os.environ.get("TORCHSPEC_ENGINE_PYTHON")
    return "vllm" if vllm_available() or (configured and Path(configured).is_file()) else "evaluator"


def run_bench(
    drafts: Sequence[tuple[str, int | None]],
    target_path: str,
    prompt_sets: Sequence[PromptSet],
    protocol: Protocol,
    tokenizer,
    engine_args: dict | None = None,
    engine_python: str | None = None,
    progress: Callable[[str], None] = lambda line: None,
) -> tuple[list[BenchResult], str]:
    """Every draft folder of ``drafts`` (``(folder, training step or None)``) on every prompt set.
    Returns the results and the judge's name with its version."""
    eos = tokenizer.eos_token_id if protocol.stop_at_eos else None
    results: list[BenchResult] = []
    judge_name = protocol.judge
    target = None
    if protocol.judge == "evaluator":
        import torch

        from torchspec.trainer.targets.in_process import load_causal_lm

        target = load_causal_lm(target_path, "--target", torch.float32)
    for folder, step in drafts:
        progress(f"measuring {folder}" + (f" (step {step})" if step is not None else ""))
        if protocol.judge == "evaluator":
            from torchspec.trainer.commands.evaluate import load_draft_for_target

            generate = _evaluator_generate(load_draft_for_target(folder, target), target, protocol, eos)
            sets = [_summarize_set(s, run_turns(s, tokenizer, generate), protocol) for s in prompt_sets]
        else:
            with _engine(folder, target_path, prompt_sets, protocol, tokenizer, engine_args, engine_python) as worker:
                judge_name = f"vllm {worker.vllm_version}"
                generate = _vllm_generate(worker, protocol, eos)
                sets = [_summarize_set(s, run_turns(s, tokenizer, generate), protocol) for s in prompt_sets]
        results.append(BenchResult(str(folder), step, sets))
    return results, judge_name


def _engine(folder, target_path, prompt_sets, protocol: Protocol, tokenizer, engine_args, engine_python):
    from torchspec.trainer.commands.evaluate import chat_prompt_ids
    from torchspec.trainer.engine.launch import EngineError, EngineWorker

    # The longest context any turn can reach: its user messages and every answer at full length.
    longest = 0
    for prompt_set in prompt_sets:
        for p in prompt_set.prompts:
            if p.turns is None:
                base = len(p.token_ids or [])
            else:
                base = len(chat_prompt_ids(tokenizer, [{"role": "user", "content": "\n".join(p.turns)}]))
                base += 32 * p.num_turns  # the template's tokens around each message
            longest = max(longest, base + p.num_turns * (protocol.max_new_tokens + protocol.num_draft_tokens + 1))
    batch = protocol.batch or max(len(s.prompts) for s in prompt_sets)
    args = {"per_request_spec_decode_metrics": "summary", **(engine_args or {})}
    options = {"draft_sample_method": "probabilistic"} if protocol.draft_sampling == "probabilistic" else {}
    try:
        return EngineWorker(
            target_path,
            dtype=protocol.dtype,
            max_model_len=max(256, -(-longest // 64) * 64),
            engine_args=args,
            python=engine_python,
            max_num_seqs=batch,
            draft=folder,
            num_draft_tokens=protocol.num_draft_tokens,
            speculative_options=options,
        )
    except EngineError as err:
        if not err.reason:
            raise
        raise EngineError(f"vLLM refused the draft {folder}: {err.reason}") from None


# --- pictures ------------------------------------------------------------------------------------


def _errors(values: list[float], intervals: list[Interval]) -> list[list[float]]:
    """Asymmetric error-bar lengths (matplotlib's ``[[below...], [above...]]``); 0 where unknown."""
    below = [0.0 if math.isnan(iv.low) else max(v - iv.low, 0.0) for v, iv in zip(values, intervals)]
    above = [0.0 if math.isnan(iv.high) else max(iv.high - v, 0.0) for v, iv in zip(values, intervals)]
    return [below, above]


def _png(figure) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _title(axes, what: str, protocol: Protocol) -> None:
    axes.set_title(f"{what}\n{protocol.short()}", fontsize=10)


def render_pictures(results: list[BenchResult], protocol: Protocol, judge: str) -> dict[str, bytes]:
    """PNG bytes by name: ``categories`` and ``positions`` (the last draft), ``steps`` (a run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocol = Protocol(**{**asdict(protocol), "judge": judge})
    last = results[-1]
    pictures: dict[str, bytes] = {}

    # Acceptance by category: one bar per category of each set, and the whole set, with intervals.
    labels, values, intervals, colors = [], [], [], []
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, s in enumerate(last.sets):
        color = palette[index % len(palette)]
        rows = [(f"{s.name}: all ({s.summary.num_prompts})", s.summary)]
        rows += [(f"{s.name}: {name} ({c.num_prompts})", c) for name, c in s.categories.items()]
        for label, summary in rows:
            labels.append(label)
            values.append(summary.acceptance_length)
            intervals.append(summary.interval)
            colors.append(color)
    figure, axes = plt.subplots(figsize=(8, 1.2 + 0.38 * len(labels)))
    positions = list(range(len(labels)))[::-1]
    axes.barh(positions, values, xerr=_errors(values, intervals), color=colors, capsize=4, alpha=0.85)
    axes.set_yticks(positions, labels)
    axes.set_xlabel(f"acceptance length (tokens per verification round; bars: {protocol.confidence:.0%} CI)")
    axes.set_ylabel("prompt set: category (prompts)")
    axes.set_xlim(0, protocol.num_draft_tokens + 1)
    axes.axvline(1.0, color="grey", linewidth=0.8, linestyle=":")
    axes.grid(axis="x", alpha=0.3)
    step = f", step {last.step}" if last.step is not None else ""
    _title(axes, f"Acceptance length by category ({Path(last.draft).name}{step})", protocol)
    pictures["categories"] = _png(figure)

    # Acceptance by draft position.
    figure, axes = plt.subplots(figsize=(7, 4.5))
    ks = list(range(1, protocol.num_draft_tokens + 1))
    for s in last.sets:
        shares = s.summary.position_acceptance
        axes.errorbar(
            ks,
            shares,
            yerr=_errors(shares, s.position_intervals),
            marker="o",
            capsize=4,
            label=f"{s.name} ({s.summary.num_prompts} prompts)",
        )
    axes.set_xticks(ks)
    axes.set_xlabel("draft position")
    axes.set_ylabel(f"share of rounds accepting it ({protocol.confidence:.0%} CI)")
    axes.set_ylim(0, 1.02)
    axes.grid(alpha=0.3)
    axes.legend()
    _title(axes, f"Acceptance by draft position ({Path(last.draft).name}{step})", protocol)
    pictures["positions"] = _png(figure)

    # Acceptance vs training step, across a run's checkpoints.
    steps = [r.step for r in results if r.step is not None]
    if steps and len(steps) == len(results):
        figure, axes = plt.subplots(figsize=(7, 4.5))
        for index, s in enumerate(results[0].sets):
            summaries = [r.sets[index].summary for r in results]
            means = [m.acceptance_length for m in summaries]
            line = axes.plot(steps, means, marker="o", label=f"{s.name} ({s.summary.num_prompts} prompts)")[0]
            axes.errorbar(
                steps,
                means,
                yerr=_errors(means, [m.interval for m in summaries]),
                fmt="none",
                ecolor=line.get_color(),
                capsize=4,
            )
            axes.fill_between(
                steps,
                [m.interval.low for m in summaries],
                [m.interval.high for m in summaries],
                color=line.get_color(),
                alpha=0.2,
            )
        if len(steps) <= 12:
            axes.set_xticks(steps)
        axes.set_xlabel("training step (checkpoint)")
        axes.set_ylabel(f"acceptance length (shaded: {protocol.confidence:.0%} CI)")
        axes.grid(alpha=0.3)
        axes.legend()
        _title(axes, "Acceptance length across the run's checkpoints", protocol)
        pictures["steps"] = _png(figure)
    return pictures


# --- the command ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from torchspec.trainer.commands.evaluate import at_least_one
    from torchspec.trainer.commands.verify import json_object

    parser = argparse.ArgumentParser(
        prog="torchspec-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--draft", help="exported draft folder (default: the last training run's <output_dir>_hf)")
    which.add_argument("--run", help="a training output_dir: every complete checkpoint in it, step by step")
    parser.add_argument("--target", help="Hugging Face target folder (default: the run's target)")
    parser.add_argument(
        "--prompts",
        action="append",
        help="prompt set: MT-Bench question.jsonl or conversations (repeatable; default: the run's eval split, "
        "the samples it held out)",
    )
    parser.add_argument("--prompt-key", default="conversations", help="the conversation column of a conversation set")
    parser.add_argument("--num-prompts", type=at_least_one, default=80, help="at most this many per set (default 80)")
    parser.add_argument("--judge", choices=JUDGES, help="default: vllm where it is installed, else evaluator")
    parser.add_argument("--num-draft-tokens", type=at_least_one, default=3, help="draft chain length (default 3)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument(
        "--draft-sampling",
        choices=("greedy", "probabilistic"),
        default="greedy",
        help="at temperature > 0: the draft proposes its argmax (vLLM's default) or samples",
    )
    parser.add_argument("--max-new-tokens", type=at_least_one, default=256, help="per turn (default 256)")
    parser.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    parser.add_argument("--batch", type=at_least_one, help="prompts vLLM decodes at once (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="sampling and bootstrap seed (default 0)")
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--resamples", type=at_least_one, default=DEFAULT_RESAMPLES)
    parser.add_argument("--engine-args", type=json_object, default={}, metavar="JSON", help="vLLM engine arguments")
    parser.add_argument("--engine-python", help="the python of the environment vLLM is installed in")
    parser.add_argument("--output", help="JSON result (default: bench.json in the --draft or --run folder)")
    return parser


# Protocol fields given by the option of the same name.
_PROTOCOL_OPTIONS = (
    "num_draft_tokens",
    "temperature",
    "top_p",
    "draft_sampling",
    "max_new_tokens",
    "batch",
    "num_prompts",
    "seed",
    "confidence",
    "resamples",
)


def _protocol(args) -> Protocol:
    judge = args.judge or _judge_default()
    if not 0 <= args.temperature:
        raise UserInputError(f"--temperature {args.temperature}: must be 0 (greedy) or more")
    if not 0 < args.top_p <= 1:
        raise UserInputError(f"--top-p {args.top_p}: must be in (0, 1]")
    if not 0 < args.confidence < 1:
        raise UserInputError(f"--confidence {args.confidence}: must be between 0 and 1, e.g. 0.95")
    if judge == "evaluator" and args.batch not in (None, 1):
        raise UserInputError(
            f"--batch {args.batch} with --judge evaluator: the evaluator decodes one prompt at a time; "
            "--batch applies to --judge vllm"
        )
    options = {name: getattr(args, name) for name in _PROTOCOL_OPTIONS}
    return Protocol(judge=judge, stop_at_eos=not args.ignore_eos, **options)


def _fill_defaults(args) -> None:
    """--target from the --run folder's config, else from the last run (and --draft: its export)."""
    from torchspec.trainer.commands.evaluate import apply_defaults, recorded_model_and_data

    if args.run is not None:
        if not Path(args.run).is_dir():
            raise UserInputError(f"--run {args.run}: no such folder; pass a training output_dir")
        recorded = recorded_model_and_data(Path(args.run))
        args.target = args.target or recorded.get("target_model_path")
    args.data = None  # apply_defaults reads it; bench's prompts are --prompts, else the run's eval split
    draft = args.draft
    apply_defaults(args)  # fills what is still None: draft, target, data (resolving the built-in ones)
    if args.run is not None:
        args.draft = None
    elif draft is None and not (Path(args.draft) / "config.json").is_file():
        raise UserInputError(
            f"--draft {args.draft}: no exported draft there; pass --draft FOLDER or --run OUTPUT_DIR "
            "(or export the last run: hatch run converter:export)"
        )


def _checkpoints(run: str) -> list[tuple[int, Path]]:
    from torchspec.draft_models.checkpoint_layout import list_checkpoints

    found = list_checkpoints(run)
    if not found:
        raise UserInputError(f"--run {run}: no complete checkpoint (iter_XXXXXXX) in it; train, or pass --draft")
    return found


@cli_main
def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer

    from torchspec.draft_models.atomic import write_file_atomic
    from torchspec.draft_models.run_pointer import last_run
    from torchspec.trainer.commands.evaluate import require_model_folders

    args = build_parser().parse_args(argv)
    protocol = _protocol(args)
    _fill_defaults(args)
    if args.draft is not None:
        require_model_folders(args.draft, args.target)
    elif not (Path(args.target) / "config.json").is_file():
        raise UserInputError(f"--target {args.target}: no config.json there")
    checkpoints = _checkpoints(args.run) if args.run is not None else []
    output = Path(args.output) if args.output else Path(args.run or args.draft) / "bench.json"
    if not output.parent.is_dir():
        raise UserInputError(f"--output {output}: its folder {output.parent} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(args.target)
    if args.prompts:
        prompt_sets = [read_prompt_set(path, tokenizer, args.prompt_key, protocol.num_prompts) for path in args.prompts]
    else:
        prompt_sets = [held_out_prompt_set(Path(args.run) if args.run else last_run(), protocol.num_prompts)]
    print(f"protocol  {protocol.describe()}")
    print(f"target    {args.target}")
    for s in prompt_sets:
        print(f"prompts   {s.name}: {len(s.prompts)} prompts ({s.layout}; {s.path})")
    sys.stdout.flush()

    with tempfile.TemporaryDirectory(prefix="torchspec-bench-") as scratch:
        drafts: list[tuple[str, int | None]] = [
            (str(draft_folder_from_checkpoint(path, Path(scratch) / path.name)), step) for step, path in checkpoints
        ] or [(args.draft, None)]
        results, judge = run_bench(
            drafts,
            args.target,
            prompt_sets,
            protocol,
            tokenizer,
            engine_args=args.engine_args,
            engine_python=args.engine_python,
            progress=lambda line: print(line, flush=True),
        )
    for result, (_, path) in zip(results, checkpoints):  # the checkpoints, not the scratch folders measured
        result.draft = str(path)
    pictures = render_pictures(results, protocol, judge)
    names = {key: output.with_name(f"{output.stem}_{key}.png") for key in pictures}
    record = {
        "protocol": {**asdict(protocol), "judge": judge, "description": protocol.describe()},
        "target": args.target,
        "results": [r.to_dict() for r in results],
        "pictures": {key: str(path) for key, path in names.items()},
    }
    print(f"judge     {judge}")
    for result in results:
        print("\n".join(_report_lines(result)))
    for key, path in names.items():
        write_file_atomic(path, pictures[key])
    write_file_atomic(output, json.dumps(record, indent=2) + "\n")
    print(f"wrote {output} and {', '.join(p.name for p in names.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
