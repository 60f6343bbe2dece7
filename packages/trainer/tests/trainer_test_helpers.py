"""Small models and datasets for the trainer tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

VOCAB = 96


def tiny_qwen3(num_layers: int = 8, vocab: int = VOCAB, hidden: int = 64, seed: int = 0, tie: bool = False):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).eval()


def save_tiny_qwen3(directory: Path, **kwargs) -> Path:
    model = tiny_qwen3(**kwargs)
    model.save_pretrained(directory)
    return Path(directory)


def token_dataset(lengths: list[int], vocab: int = VOCAB, seed: int = 0) -> list[dict]:
    """Samples with distinct content: sample i starts with token i % vocab (tests identify samples by it)."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for index, length in enumerate(lengths):
        ids = torch.randint(0, vocab, (length,), generator=generator)
        ids[0] = index
        mask = (torch.arange(length) >= length // 3).long()
        samples.append({"input_ids": ids.tolist(), "loss_mask": mask.tolist(), "index": index})
    return samples


# --- integration runs ------------------------------------------------------------------------------

SMALL_TARGET = {
    "hidden_size": 64,
    "num_hidden_layers": 7,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "max_seq_length": 128,
    "train_steps": 120,
    "batch_size": 16,
}


def build_small_assets(root: Path) -> dict:
    """A briefly trained tiny target (through the same builder as the default one) and a short
    conversation file, under ``root``."""
    import json

    from torchspec.data import sample_conversations_path
    from torchspec.trainer.commands.default_assets import TinyTargetRecipe, ensure_default_target

    target = ensure_default_target(root / "targets", TinyTargetRecipe(**SMALL_TARGET))
    conversations = root / "conversations.jsonl"
    lines = sample_conversations_path().read_text().splitlines()[:56]
    conversations.write_text("\n".join(lines) + "\n")
    bad = root / "broken.jsonl"
    bad.write_text('{"conversations": [{"role": "user", "content": "hi"}]}\n' + "not json\n")
    return {
        "target": str(target),
        "train_path": str(conversations),
        "cache_dir": str(root / "data_cache"),
        "broken": str(bad),
        "lines": [json.loads(line) for line in lines],
    }


def small_overrides(assets: dict, output_dir: Path, **extra) -> list[str]:
    values = {
        "model.target_model_path": assets["target"],
        "data.train_path": assets["train_path"],
        "data.cache_dir": assets["cache_dir"],
        "data.max_seq_length": 96,
        "data.eval_split": 0.15,
        "training.output_dir": str(output_dir),
        "training.device": "cpu",
        "training.micro_batch_size": 2,
        "training.global_batch_size": 8,
        "training.max_steps": 8,
        "ttt.length": 3,
        "optimizer.learning_rate": 3e-3,
        "lr_schedule.warmup_ratio": 0.1,
        "metrics.eval_interval": 4,
        "metrics.log_interval": 4,
        "metrics.progress_bar": False,
        "checkpoint.keep_last": None,
        "metrics.speculative_eval_prompts": 0,
        "metrics.real_acceptance_prompts": 0,  # real acceptance during training: tests/test_acceptance.py
        "checkpoint.resume": None,  # a fresh run unless a test asks to resume (the shipped default is auto)
    }
    values.update(extra)
    return [f"{key}={'null' if value is None else value}" for key, value in values.items()]


class Interrupted(Exception):
    """What :func:`interrupt_at`'s step callback raises: a run killed after that step."""


def interrupt_at(stop: int):
    """A ``step_callback`` that interrupts a run after step ``stop`` (its checkpoint, if any, saved)."""

    def callback(step, record):
        if step == stop:
            raise Interrupted

    return callback


def assert_one_line_error(code, err, *fragments, expected_code=2):
    """The CLI standard for a user mistake: exit ``expected_code``, exactly one non-empty stderr line,
    starting with ``error: `` and holding every fragment, and no traceback."""
    assert code == expected_code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def read_metrics(output_dir: Path, split: str = "train") -> dict[int, dict]:
    """Metrics records by step (each step is logged once, also across a resume)."""
    import json

    records = {}
    for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["split"] == split:
            records[record["step"]] = record
    return records


class SmallCheckpointModel(torch.nn.Module):
    """A model with a parameter, a head and an integer buffer, for checkpoint round trips."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)
        self.head = torch.nn.Linear(3, 5, bias=False)
        self.register_buffer("d2t", torch.zeros(5, dtype=torch.long))


def trained_small_model(seed=0):
    """``(model, AdamW)`` after one step, so the optimizer has state to save."""
    torch.manual_seed(seed)
    model = SmallCheckpointModel()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model.head(model.fc(torch.randn(2, 4))).pow(2).sum().backward()
    optimizer.step()
    model.d2t.copy_(torch.arange(5) * (seed + 1))
    return model, optimizer


SMALL_AUX_LAYERS = [0, 1, 2]


def small_states(model, optimizer=None, step: int = 0) -> dict:
    """The ``states`` mapping of a checkpoint round trip: model, optimizer (when given), a train
    state at ``step`` and this rank's RNG, the trainer's own components."""
    from torchspec.trainer.loop.states import ModelState, OptimizerState, RNGState, TrainState

    states = {"model": ModelState(model)}
    if optimizer is not None:
        states["optimizer"] = OptimizerState(model, optimizer)
    return {**states, "train": TrainState(list(SMALL_AUX_LAYERS), step=step), "rng": RNGState()}


def save_small_checkpoint(checkpointer, step, model, optimizer, files=None):
    return checkpointer.save(step, small_states(model, optimizer, step), files)


def save_small_llama_draft(folder, vocab: int, hidden_size: int, target_hidden: int, seed: int, **save_kwargs):
    """A small random Llama draft in serving format (its own random embed_tokens, float32)."""
    from torchspec.draft_models import AutoEagle3DraftModel, LlamaEagle3Config

    config = LlamaEagle3Config(
        hidden_size=hidden_size,
        target_hidden_size=target_hidden,
        vocab_size=vocab,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=48,
        max_position_embeddings=256,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    return AutoEagle3DraftModel.from_config(config).save_pretrained(folder, **save_kwargs)


class FakeVllmServer:
    """The part of a vLLM OpenAI server the project talks to, without vLLM: GET /v1/models, /version,
    /metrics (Prometheus text as vLLM writes it); POST /v1/completions with ``return_token_ids``.

    Every prompt is answered with prompt[-1] + 1, + 2, ... and counts ``rounds`` drafts per request,
    of which the first position is accepted ``accepted`` times; ``stranger_tokens`` more generated
    tokens appear in its counters (someone else's requests). ``per_request``: replies carry vLLM's
    per-request speculative-decoding counts (``--per-request-spec-decode-metrics summary``).

    As a judge (``VLLM_SERVER_DEV_MODE=1`` and the reload extension; ``dev_mode=False``: neither):
    POST /collective_rpc ``torchspec_reload_draft`` records the folder's tensors in ``reloads`` and
    takes the next value of ``accepted_after_reload`` as its ``accepted``; reloads whose index is in
    ``failing_reloads`` answer 500, and at reload ``exit_at_reload`` the process ends at once (exit
    code 1, as a crashed server); POST /reset_prefix_cache answers ``{"success": true}``."""

    def __init__(
        self,
        num_draft_tokens: int,
        rounds: int = 3,
        accepted: int = 2,
        stranger_tokens: int = 0,
        per_request: bool = False,
        dev_mode: bool = True,
        accepted_after_reload: list[int] | None = None,
        failing_reloads: tuple[int, ...] = (),
        port: int = 0,
        exit_at_reload: int | None = None,
    ):
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.k, self.rounds, self.accepted, self.stranger = num_draft_tokens, rounds, accepted, stranger_tokens
        self.per_request, self.dev_mode, self.failing_reloads = per_request, dev_mode, failing_reloads
        self.exit_at_reload = exit_at_reload
        self.accepted_after_reload = list(accepted_after_reload or [])
        self.reloads: list[dict[str, torch.Tensor]] = []
        self.prefix_cache_resets = 0
        self.counts = {"drafts": 4, "accepted": 1, "generated": 10, "per_pos": [1] + [0] * (num_draft_tokens - 1)}
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, body: str, content_type="application/json", status=200):
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/v1/models":
                    return self._send(json.dumps({"data": [{"id": "target"}]}))
                if self.path == "/version":
                    return self._send(json.dumps({"version": "0.32.0-fake"}))
                self._send(server.metrics(), "text/plain")

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path in ("/collective_rpc", "/reset_prefix_cache"):
                    if not server.dev_mode:
                        return self._send(json.dumps({"detail": "Not Found"}), status=404)
                    if self.path == "/reset_prefix_cache":
                        server.prefix_cache_resets += 1
                        return self._send(json.dumps({"success": True}))
                    return self._reload(request)
                assert request["temperature"] == 0.0 and request["ignore_eos"] and request["return_token_ids"]
                n, last = request["max_tokens"], request["prompt"][-1]
                with server.lock:
                    server.counts["generated"] += n + server.stranger
                    if server.k:
                        server.counts["drafts"] += server.rounds
                        server.counts["accepted"] += server.accepted
                        server.counts["per_pos"][0] += server.accepted
                reply: dict = {"choices": [{"token_ids": [last + i for i in range(1, n + 1)]}]}
                if server.per_request and server.k:
                    stats = {"num_spec_steps": server.rounds, "num_accepted_draft_tokens": server.accepted}
                    reply["metrics"] = {"speculative_decoding": stats}
                self._send(json.dumps(reply))

            def _reload(self, request):
                from safetensors.torch import load_file

                from torchspec.trainer.engine.draft_reload import folder_digest

                assert request["method"] == "torchspec_reload_draft"
                (folder,) = request["args"]
                index = len(server.reloads)
                if index == server.exit_at_reload:
                    os._exit(1)
                server.reloads.append(load_file(str(Path(folder) / "model.safetensors")))
                if index in server.failing_reloads:
                    return self._send(json.dumps({"detail": "RuntimeError: the worker died"}), status=500)
                if server.accepted_after_reload:
                    server.accepted = server.accepted_after_reload.pop(0)
                report = {"folder": folder, "tensors": len(server.reloads[-1]), "digest": folder_digest(folder)}
                self._send(json.dumps({"results": [report, report]}))  # two workers (tensor parallel 2)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def metrics(self) -> str:
        c, label = self.counts, '{engine="0",model_name="target"}'
        lines = [f"vllm:generation_tokens_total{label} {c['generated']}.0"]
        if self.k:
            lines += [
                f"vllm:spec_decode_num_drafts_total{label} {c['drafts']}.0",
                f"vllm:spec_decode_num_draft_tokens_total{label} {c['drafts'] * self.k}.0",
                f"vllm:spec_decode_num_accepted_tokens_total{label} {c['accepted']}.0",
            ]
            lines += [
                f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{engine="0",model_name="target",position="{i}"}} '
                f"{count}.0"
                for i, count in enumerate(c["per_pos"])
            ]
        return "\n".join(lines) + "\n"

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    """``trainer train`` with ``args`` under torchrun (gloo, one OpenMP thread per rank)."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "torchspec.trainer.cli",
        "train",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, check=False)
