"""Simulated fleet: trainer tokens/s against the number of states servers, to see where the draft
becomes the bottleneck (docs/training-large-targets.md, "Sizing a fleet").

Each simulated server answers the fleet's requests like a `vllm serve` states server (the same
API, states files of the right shape) but computes nothing: it sleeps as long as a prefill of the
prompt takes at ``--server-tokens-per-s`` and handles ``--server-concurrency`` requests at a time.
The trainer is the real one (``target.backend=fleet``, the default tiny target and data, one rank
on this machine's CPU). Tokens/s are measured over the steps after the first.

    python benchmarks/fleet_scaling.py --servers 1 2 4 8 --server-tokens-per-s 2000
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from safetensors.torch import save_file


class ThrottledStatesServer:
    """Answers /v1/models and /v1/completions with states of shape [T, layers, hidden]."""

    def __init__(self, name: str, layers: int, hidden: int, tokens_per_s: float, concurrency: int, folder: Path):
        slots = threading.Semaphore(concurrency)
        counter = iter(range(1 << 62))

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self.reply({"data": [{"id": name}]})

            def do_POST(self):
                prompt = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["prompt"]
                with slots:  # a server computes `concurrency` prefills at once
                    time.sleep(len(prompt) / tokens_per_s)
                path = folder / f"{id(self)}-{next(counter)}.safetensors"
                states = torch.randn(len(prompt), layers, hidden) * 0.1
                save_file({"hidden_states": states, "token_ids": torch.tensor(prompt)}, str(path))
                self.reply({"choices": [{}], "kv_transfer_params": {"hidden_states_path": str(path)}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def measure(num_servers: int, args, workdir: Path) -> dict:
    from torchspec.draft_models import default_aux_layer_ids
    from torchspec.trainer.commands.default_assets import ensure_default_target
    from torchspec.trainer.config import load_config
    from torchspec.trainer.engine.fleet import served_model_name
    from torchspec.trainer.loop.run import train

    target = ensure_default_target()
    config_json = json.loads((target / "config.json").read_text())
    layers = config_json["num_hidden_layers"]
    layer_ids = [*default_aux_layer_ids(layers), layers]
    servers = [
        ThrottledStatesServer(
            served_model_name(layer_ids),
            len(layer_ids),
            config_json["hidden_size"],
            args.server_tokens_per_s,
            args.server_concurrency,
            workdir,
        )
        for _ in range(num_servers)
    ]
    stamps: list[tuple[float, int]] = []
    try:
        config = load_config(
            args.config,
            [
                "target.backend=fleet",
                f"target.servers={json.dumps([s.url for s in servers])}",
                f"training.output_dir={workdir / f'run-{num_servers}'}",
                f"training.max_steps={args.steps}",
                "metrics.progress_bar=false",
                "metrics.eval_interval=0",
                "metrics.speculative_eval_prompts=0",
                "metrics.log_interval=1000",
                "checkpoint.save_interval=0",
                f"target.prefetch_batches={args.prefetch_batches}",
            ],
        )
        train(config, step_callback=lambda step, record: stamps.append((time.perf_counter(), record["tokens"])))
    finally:
        for server in servers:
            server.stop()
    timed = stamps[1:]  # the first step waits for the first batches and warms up
    seconds = timed[-1][0] - stamps[0][0]
    tokens = sum(tokens for _, tokens in timed)
    return {"servers": num_servers, "trainer_tokens_per_s": tokens / seconds, "steps_timed": len(timed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--server-tokens-per-s", type=float, default=2000.0, help="prefill speed of one server")
    parser.add_argument(
        "--server-concurrency", type=int, default=1, help="prefills one server runs at once, each at that speed"
    )
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--prefetch-batches", type=int, default=2)
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "default_llama.yaml"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="torchspec-fleet-sim-") as scratch:
        for count in args.servers:
            rows.append(measure(count, args, Path(scratch)))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nserver prefill {args.server_tokens_per_s:.0f} tokens/s x {args.server_concurrency} at once")
    print("| servers | trainer tokens/s |\n|---|---|")
    for row in rows:
        print(f"| {row['servers']} | {row['trainer_tokens_per_s']:.0f} |")


if __name__ == "__main__":
    main()
