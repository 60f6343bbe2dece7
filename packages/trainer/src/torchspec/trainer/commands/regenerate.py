"""``hatch run trainer:regenerate``: the target writes the assistant answers of a conversation dataset.

A draft accepts best what it was trained on, and what a deployed draft sees is the *target's* own
output. Training on answers the target itself would give therefore raises acceptance over training
on answers some other model (or person) wrote. This command reads the configured conversations
(``data.train_path``), regenerates every assistant turn with the target served by vLLM (a plain
engine in a child process, :class:`~torchspec.trainer.targets.engine.EngineWorker`), and writes a
JSON Lines dataset the data package reads: one ``{prompt_key: [messages]}`` object per line, the
non-assistant messages unchanged.

Turns are regenerated in order: the prompt of assistant turn ``k`` is the conversation up to that
turn, earlier assistant turns already replaced by the target's answers, rendered with
``data.chat_template`` (the same rendering training uses, so the context the answer was generated
in is the context the draft trains on) plus the template's generation prompt. The ``k``-th turns of
all conversations go to the engine as one request. Generation stops at the template's end-of-turn
token or EOS, which is cut off the answer; for a thinking template, the text between the reasoning
markers becomes ``reasoning_content`` (``--thinking keep``) or is dropped (``--thinking drop``).

A conversation ends before a turn it cannot regenerate: a prompt over ``data.max_seq_length``
tokens (counted as skipped, with the later turns of that conversation) or an answer with no content
(which the data package would reject); one left without any assistant turn is not written.

Conversations are regenerated in chunks (``--chunk-size``, the k-th turns of a chunk are one request)
and each one is saved as soon as its last turn is answered: appended to ``OUT.partial`` (its first
line records the settings), flushed and fsynced after every request, so a killed multi-hour run
keeps what it finished and the same command continues it (a different setting is refused, naming
it). At the end ``OUT`` is written in input order, then ``OUT.meta.json`` (the target, the sampling
settings, the source and the counts), each atomically (``torchspec.draft_models.atomic``); the meta
is last, so its presence means the run finished. Then ``OUT.partial`` is removed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from torchspec.draft_models.atomic import fsync_dir, write_file_atomic
from torchspec.draft_models.errors import TorchSpecError, UserInputError, cli_main

__all__ = [
    "RegenerationStats",
    "main",
    "regenerate_conversations",
    "regenerate_dataset",
    "split_answer",
    "turn_prompt",
]

logger = logging.getLogger(__name__)

Thinking = Literal["keep", "drop"]


class _Worker(Protocol):
    """What regeneration needs of an engine: :class:`~torchspec.trainer.targets.engine.EngineWorker`."""

    def send(self, op: str, **request: Any) -> int: ...

    def reply(self, request_id: int) -> dict: ...

    def close(self) -> None: ...


@dataclass
class RegenerationStats:
    conversations: int = 0  # read from the source (after --limit)
    written: int = 0  # conversations in the output
    turns_regenerated: int = 0
    turns_skipped: int = 0  # prompt over the length limit, with the later turns of its conversation
    empty_answers: int = 0  # answers without content; their conversation ends before them
    cut_at_max_new_tokens: int = 0  # answers that reached --max-new-tokens without an end of turn
    tokens_generated: int = 0
    seconds: float = 0.0  # generation, from the first request to the last answer (of this invocation)
    engine_start_seconds: float = 0.0

    def add(self, counts: dict[str, int]) -> None:
        """Add one conversation's counts (:data:`COUNTED`)."""
        for name in COUNTED:
            setattr(self, name, getattr(self, name) + counts.get(name, 0))

    def summary(self) -> str:
        return (
            f"{self.conversations} conversations ({self.written} written), {self.turns_regenerated} turns "
            f"regenerated, {self.turns_skipped} skipped (prompt too long), {self.empty_answers} empty answers, "
            f"{self.cut_at_max_new_tokens} cut at --max-new-tokens, {self.tokens_generated} tokens generated "
            f"in {self.seconds:.1f} s (+ {self.engine_start_seconds:.1f} s engine start)"
        )


# What is counted per conversation (and saved with it, so a continued run's totals are the whole run's).
COUNTED = ("turns_regenerated", "turns_skipped", "empty_answers", "cut_at_max_new_tokens", "tokens_generated")

# Called after every request with the conversations it finished: (index, conversation to write or
# None, its counts), index into the ``conversations`` given.
Finished = Callable[[list[tuple[int, list[dict] | None, dict[str, int]]]], None]


def turn_prompt(template, messages: list[dict]) -> str:
    """The text the target continues to answer after ``messages``: their render plus the generation prompt."""
    return template.render(messages).text + template.generation_prompt


def split_answer(text: str, template, thinking: Thinking = "keep") -> tuple[str, str | None]:
    """``(content, reasoning)`` of a generated turn, end of turn already removed.

    For a template with reasoning markers, the text between them is the reasoning (None with
    ``thinking="drop"`` or when there is none). Unfinished reasoning (no closing marker) leaves no
    content. The template's content prefix (gpt-oss's final channel header) is not content either.
    """
    reasoning: str | None = None
    markers = template.reasoning
    if markers is not None:
        opened = markers.opener_in_prompt or text.startswith(markers.open)
        body = text if markers.opener_in_prompt else text.removeprefix(markers.open)
        if opened:
            at = body.find(markers.close)
            if at >= 0:
                reasoning, text = body[:at], body[at + len(markers.close) :]
            elif markers.close.strip() and body.find(markers.close.strip()) >= 0:
                # The marker without the whitespace the template puts around it: keep the split, lose
                # the whitespace (the training render writes the template's own).
                at = body.find(markers.close.strip())
                reasoning, text = body[:at].strip(), body[at + len(markers.close.strip()) :].lstrip()
            else:
                reasoning, text = body, ""
    content = text.removeprefix(template.content_prefix) if template.content_prefix else text
    if thinking == "drop" or not (reasoning and reasoning.strip()):
        reasoning = None
    return content, reasoning


def _stop_token_ids(tokenizer, template, eos_token_ids: list[int]) -> list[int]:
    """End-of-turn tokens and EOS, except those the model also writes *inside* a turn (gpt-oss's
    ``<|end|>`` closes its analysis channel, so only ``<|return|>`` ends its answer)."""
    inside = template.content_prefix
    if template.reasoning is not None:
        inside += template.reasoning.open + template.reasoning.close
    candidates = [template.end_of_turn, template.last_end_of_turn or ""]
    candidates += [tokenizer.convert_ids_to_tokens(i) for i in eos_token_ids]
    stops = set()
    vocab = tokenizer.get_vocab()
    for token in candidates:
        if token and token not in inside and token in vocab:
            stops.add(vocab[token])
    return sorted(stops)


def regenerate_conversations(
    conversations: list[list[dict]],
    worker: _Worker,
    tokenizer,
    template,
    *,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    thinking: Thinking = "keep",
    max_prompt_tokens: int | None = None,
    eos_token_ids: list[int] | None = None,
    on_finished: Finished | None = None,
) -> tuple[list[list[dict]], RegenerationStats]:
    """Regenerate every assistant turn of normalized ``conversations`` with ``worker``'s engine.

    Returns the conversations to write (in input order; those left without an assistant turn
    are left out) and the counts. ``template`` is a registry :class:`~torchspec.data.ChatTemplate`.
    ``on_finished`` is called after every request with the conversations it finished (see
    :data:`Finished`), so that a caller can save them before the others are done.
    """
    start = time.perf_counter()
    eos = list(eos_token_ids) if eos_token_ids is not None else [tokenizer.eos_token_id]
    stops = _stop_token_ids(tokenizer, template, [i for i in eos if i is not None])
    stats = RegenerationStats(conversations=len(conversations))
    current = [[dict(message) for message in messages] for messages in conversations]
    positions = [[i for i, m in enumerate(messages) if m["role"] == "assistant"] for messages in conversations]
    ends_at: list[int | None] = [None] * len(conversations)  # where a conversation was cut
    counts: list[dict[str, int]] = [dict.fromkeys(COUNTED, 0) for _ in conversations]

    def final(index: int) -> list[dict] | None:
        """What is written of conversation ``index`` once finished (None: nothing to train on)."""
        messages, end = current[index], ends_at[index]
        if end is not None:
            kept = [i for i in positions[index] if i < end]
            if not kept:
                return None  # nothing the target wrote is left to train on
            messages = messages[: kept[-1] + 1]  # end on the last answer, not on an unanswered prompt
        return [_output_message(m) for m in messages]

    def report(indices: list[int]) -> None:
        if on_finished is not None and indices:
            on_finished([(index, final(index), counts[index]) for index in indices])

    report([index for index, turns in enumerate(positions) if not turns])  # nothing to ask: finished
    for turn in range(max((len(p) for p in positions), default=0)):
        finished: list[int] = []
        batch: list[tuple[int, int]] = []
        texts: list[str] = []
        for index, turns in enumerate(positions):
            if ends_at[index] is not None or turn >= len(turns):
                continue
            batch.append((index, turns[turn]))
            texts.append(turn_prompt(template, current[index][: turns[turn]]))
        encoded = [e.ids for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
        prompts = []
        for (index, position), ids in zip(batch, encoded):
            if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
                ends_at[index] = position
                counts[index]["turns_skipped"] += len(positions[index]) - turn  # later prompts only grow
                finished.append(index)
            else:
                prompts.append((index, position, ids))
        if not prompts:
            report(finished)
            continue
        asked = time.perf_counter()
        request = worker.send(
            "generate",
            prompts=[ids for _, _, ids in prompts],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop_token_ids=stops,
        )
        reply = worker.reply(request)
        outputs, reasons = reply["outputs"], reply.get("finish_reasons") or [None] * len(reply["outputs"])
        if len(outputs) != len(prompts):
            from torchspec.trainer.engine.launch import EngineError

            raise EngineError(f"the engine answered {len(outputs)} of {len(prompts)} prompts of turn {turn + 1}")
        generated = 0
        for (index, position, _), ids, reason in zip(prompts, outputs, reasons):
            generated += len(ids)
            counts[index]["tokens_generated"] += len(ids)
            ended = bool(ids) and ids[-1] in stops
            if not ended and (reason == "length" or len(ids) >= max_new_tokens):
                counts[index]["cut_at_max_new_tokens"] += 1
            # Verbatim: special tokens (reasoning markers) stay, and no "clean-up" of spaces before
            # punctuation, which some tokenizers apply by default and which would change the text.
            text = tokenizer.decode(
                ids[:-1] if ended else ids, skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
            content, reasoning = split_answer(text, template, thinking)
            if not content.strip():
                counts[index]["empty_answers"] += 1
                ends_at[index] = position
                finished.append(index)
                continue
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if reasoning is not None:
                message["reasoning_content"] = reasoning
            current[index][position] = message
            counts[index]["turns_regenerated"] += 1
            if turn == len(positions[index]) - 1:
                finished.append(index)
        logger.info(
            "turn %d: %d answers, %d tokens in %.1f s", turn + 1, len(prompts), generated, time.perf_counter() - asked
        )
        report(finished)
    for conversation_counts in counts:
        stats.add(conversation_counts)
    written = [messages for messages in map(final, range(len(conversations))) if messages is not None]
    stats.written = len(written)
    stats.seconds = time.perf_counter() - start
    return written, stats


def _output_message(message: dict) -> dict:
    """OpenAI-style message; ``reasoning_content`` only when there is some."""
    out = {"role": message["role"], "content": message["content"]}
    if message.get("reasoning_content"):
        out["reasoning_content"] = message["reasoning_content"]
    return out


# --- the command --------------------------------------------------------------------------------------


def _meta_path(output: Path) -> Path:
    return output.with_name(output.name + ".meta.json")


def _check_output(output: str | os.PathLike | None, overwrite: bool) -> Path:
    if output is None:
        raise UserInputError("--output is required: the .jsonl file to write, e.g. --output regenerated.jsonl")
    path = Path(output)
    if path.suffix != ".jsonl":
        raise UserInputError(f"--output {output}: the file must end in .jsonl (the data package reads it by suffix)")
    if path.is_dir():
        raise UserInputError(f"--output {output} is a directory; name a .jsonl file")
    if path.exists() and not overwrite:
        raise UserInputError(f"--output {output} exists; pass --overwrite to replace it, or choose another file")
    return path


def _eos_token_ids(target_path: Path, tokenizer) -> list[int]:
    """The tokenizer's EOS and the target's generation_config EOS ids (vLLM stops at those too)."""
    ids = [tokenizer.eos_token_id]
    try:
        eos = json.loads((target_path / "generation_config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError):
        eos = None
    ids += eos if isinstance(eos, list) else [eos]
    return sorted({int(i) for i in ids if i is not None})


def _max_position_embeddings(target_path: Path) -> int | None:
    try:
        value = json.loads((target_path / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, int) and value > 0 else None


def _start_engine(target_path: Path, *, dtype: str, max_model_len: int, config) -> _Worker:
    """A plain (generating) vLLM engine for the target; tests replace this."""
    from torchspec.trainer.engine.launch import EngineWorker, engine_options

    return EngineWorker(target_path, dtype=dtype, max_model_len=max_model_len, **engine_options(config))


def _partial_path(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


class _Progress:
    """``OUT.partial``: the settings line, then one line per finished conversation
    (``{"index", "conversation", "counts"}``), appended and fsynced after every request.

    Opened again by a rerun: with the same settings it continues (a line cut by a kill is dropped);
    with others it is refused, so that two runs' answers never mix in one dataset."""

    def __init__(self, output: Path, settings: dict[str, Any]):
        self.path = _partial_path(output)
        self.done: dict[int, tuple[list[dict] | None, dict[str, int]]] = {}
        whole = 0  # bytes of the file up to its last whole line
        if self.path.is_file():
            with open(self.path, "rb") as handle:
                lines = handle.read().split(b"\n")
            try:
                saved = json.loads(lines[0])["settings"]
            except (ValueError, KeyError, TypeError):
                saved = None
            differing = _differing(saved, settings) if isinstance(saved, dict) else ["its first line"]
            if differing:
                raise UserInputError(
                    f"{self.path} holds a partial run with other settings ({', '.join(differing)}); run the same "
                    f"command as that run to continue it, or delete {self.path} to start over"
                )
            whole = len(lines[0]) + 1
            for line in lines[1:-1]:  # the last element follows the last newline: empty or cut by a kill
                try:
                    record = json.loads(line)
                    self.done[int(record["index"])] = (record["conversation"], record["counts"])
                except (ValueError, KeyError, TypeError):
                    break  # cut by a kill in the middle of a write: this and what follows are redone
                whole += len(line) + 1
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab")
        if whole:
            self._file.truncate(whole)
        else:
            self._file.truncate(0)
            self._append([{"settings": settings}])
            fsync_dir(self.path.parent)

    def _append(self, records: list[dict]) -> None:
        self._file.write(b"".join(json.dumps(r).encode() + b"\n" for r in records))
        self._file.flush()
        os.fsync(self._file.fileno())  # a kill or a crash keeps every conversation of this request

    def add(self, finished: list[tuple[int, list[dict] | None, dict[str, int]]]) -> None:
        for index, conversation, counts in finished:
            self.done[index] = (conversation, counts)
        self._append([{"index": i, "conversation": c, "counts": n} for i, c, n in finished])

    def close(self) -> None:
        self._file.close()


def _differing(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return sorted(key for key in set(saved) | set(current) if saved.get(key) != current.get(key))


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[k : k + size] for k in range(0, len(items), size)]


def regenerate_dataset(
    config,
    output: str | os.PathLike,
    *,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    thinking: Thinking = "keep",
    limit: int | None = None,
    overwrite: bool = False,
    chunk_size: int = 1024,
) -> RegenerationStats:
    """Regenerate the assistant turns of ``config.data.train_path`` with ``config.model``'s target
    on vLLM and write them to ``output`` (``.jsonl``) and ``output.meta.json``; ``chunk_size``
    conversations at a time, each saved to ``output.partial`` once finished (a rerun continues)."""
    import torch

    from torchspec.data import DataError, get_template, load_conversation_dataset
    from torchspec.data.tokenization import ConversationEncoder
    from torchspec.trainer.__about__ import __version__
    from torchspec.trainer.loop.training_data import data_source
    from torchspec.trainer.targets.resolve import load_tokenizer, resolve_target_path

    path = _check_output(output, overwrite)
    m, d = config.model, config.data
    if d.chat_template == "hf":
        raise UserInputError(
            "data.chat_template=hf: regenerate needs a registry template (it must know the end-of-turn and "
            "reasoning markers); set data.chat_template to the target's, e.g. qwen3-thinking"
        )
    template = get_template(d.chat_template)
    target_path = resolve_target_path(m.target_model_path)
    tokenizer = load_tokenizer(m.tokenizer_path or target_path, m.trust_remote_code)
    ConversationEncoder(tokenizer, template)  # checks the template's special tokens against the tokenizer
    source = data_source(d.train_path)
    try:
        records = load_conversation_dataset(
            source, d.prompt_key, cache_dir=Path(d.cache_dir) / "records" if d.cache_dir else None
        )
    except DataError as err:
        raise DataError(f"data.train_path: {err}") from None
    if limit is not None:
        records = records.select(range(min(limit, len(records))))
    conversations = [
        [{k: v for k, v in message.items() if v is not None} for message in record]
        for record in records["conversations"]
    ]

    dtype = m.dtype
    if dtype == "auto":  # the trainer's meaning of auto
        dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    # Room for the longest prompt kept and its answer, within the target's positions.
    max_model_len = -(-(d.max_seq_length + max_new_tokens) // 64) * 64
    positions = _max_position_embeddings(target_path)
    if positions is not None:
        max_model_len = min(max_model_len, positions)
    max_model_len = int(config.target.engine_args.get("max_model_len", max_model_len))
    max_prompt_tokens = min(d.max_seq_length, max_model_len - 1)  # vLLM wants room for one new token

    # What makes two runs' answers the same: a rerun continues OUT.partial only with all of these equal.
    settings = {
        "target_path": str(target_path),
        "tokenizer": str(m.tokenizer_path or target_path),
        "dtype": dtype,
        "source_path": str(source),
        "prompt_key": d.prompt_key,
        "chat_template": d.chat_template,
        "limit": limit,
        "max_prompt_tokens": max_prompt_tokens,
        "sampling": {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed},
        "thinking": thinking,
        "num_conversations": len(conversations),
    }
    progress = _Progress(path, settings)
    resumed = len(progress.done)
    remaining = [index for index in range(len(conversations)) if index not in progress.done]
    logger.info(
        "regenerating %d conversations from %s with %s (vLLM, %s, max_model_len %d)%s",
        len(remaining),
        d.train_path,
        m.target_model_path,
        dtype,
        max_model_len,
        f"; {resumed} already in {progress.path}" if resumed else "",
    )
    stats = RegenerationStats(conversations=len(conversations))
    worker: _Worker | None = None
    try:
        if remaining:  # else everything was in OUT.partial: no engine to start
            started = time.perf_counter()
            worker = _start_engine(target_path, dtype=dtype, max_model_len=max_model_len, config=config)
            stats.engine_start_seconds = time.perf_counter() - started
        for chunk in _chunks(remaining, chunk_size):

            def save(finished, chunk=chunk):  # chunk-local indices -> source indices
                progress.add([(chunk[index], conversation, counts) for index, conversation, counts in finished])

            assert worker is not None  # started above: there are remaining conversations
            _, chunk_stats = regenerate_conversations(
                [conversations[index] for index in chunk],
                worker,
                tokenizer,
                template,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                thinking=thinking,
                max_prompt_tokens=max_prompt_tokens,
                eos_token_ids=_eos_token_ids(target_path, tokenizer),
                on_finished=save,
            )
            stats.seconds += chunk_stats.seconds
    except TorchSpecError as err:
        if progress.done:  # the error's own line, and that nothing finished is lost
            err.args = (
                f"{err}; the {len(progress.done)} conversations finished are kept in {progress.path}: run the same "
                "command again to continue",
            )
        raise
    finally:
        if worker is not None:
            worker.close()
        progress.close()

    written = []
    for index in range(len(conversations)):
        conversation, counts = progress.done[index]
        stats.add(counts)
        if conversation is not None:
            written.append(conversation)
    stats.written = len(written)
    meta = {
        "target": m.target_model_path,
        "target_path": str(target_path),
        "tokenizer": str(m.tokenizer_path or target_path),
        "dtype": dtype,
        "source": d.train_path,
        "source_path": str(source),
        "prompt_key": d.prompt_key,
        "chat_template": d.chat_template,
        "limit": limit,
        "max_prompt_tokens": max_prompt_tokens,
        "sampling": settings["sampling"],
        "thinking": thinking,
        "engine": {
            "vllm_version": getattr(worker, "vllm_version", None),
            "max_model_len": max_model_len,
            "engine_args": config.target.engine_args,
        },
        "stats": asdict(stats),
        "resumed_conversations": resumed,  # taken from OUT.partial of an earlier, interrupted run
        "torchspec_trainer_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    # The data first, the meta last: the meta's presence says the run finished.
    write_file_atomic(path, "".join(json.dumps({d.prompt_key: c}) + "\n" for c in written))
    write_file_atomic(_meta_path(path), json.dumps(meta, indent=2) + "\n")
    progress.path.unlink()
    return stats


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchspec-trainer regenerate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output", help="the .jsonl file to write (required); OUT.meta.json goes beside it")
    parser.add_argument("--config", help="YAML config file (default: the embedded demo config)")
    parser.add_argument("--temperature", type=_non_negative_float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=_positive(float), default=1.0)
    parser.add_argument("--max-new-tokens", type=_positive(int), default=512, help="per answer (default 512)")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="sampling seed of every request (temperature > 0; equal prompts, equal answers)",
    )
    parser.add_argument(
        "--thinking",
        choices=["keep", "drop"],
        default="keep",
        help="thinking templates: keep the reasoning as reasoning_content, or drop it (default keep)",
    )
    parser.add_argument("--limit", type=_positive(int), help="regenerate only the first N conversations")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument(
        "--chunk-size",
        type=_positive(int),
        default=1024,
        help="conversations regenerated together (their k-th turns are one request); each is saved to "
        "OUT.partial once finished, and the same command continues a killed run (default 1024)",
    )
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. data.train_path=my.jsonl")
    return parser


@cli_main(
    interrupted="interrupted; finished conversations are kept in OUT.partial: run the same command again to continue"
)
def main(argv: list[str] | None = None) -> int:
    from torchspec.trainer.config import load_config

    args = build_parser().parse_intermixed_args(argv)
    if args.top_p > 1:
        raise UserInputError(f"--top-p {args.top_p}: must be in (0, 1]")
    _check_output(args.output, args.overwrite)  # before the config and the target are loaded
    config = load_config(args.config, args.overrides)
    stats = regenerate_dataset(
        config,
        args.output,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        thinking=args.thinking,
        limit=args.limit,
        overwrite=args.overwrite,
        chunk_size=args.chunk_size,
    )
    print(f"regenerated {stats.summary()}; wrote {args.output} and {_meta_path(Path(args.output)).name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
