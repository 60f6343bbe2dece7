"""target.backend=fleet with real ``vllm serve`` states servers (the default tiny target, CPU):
two servers feed a two-rank torchrun (gloo) with the per-step losses of the same two-rank run on the
in-process target, and keep doing so when one server is killed mid-run.

Two servers start once for the module (each an API server and an engine core: about a minute on
2 cores); the two fleet runs and the in-process reference run one after the other, and the last
test kills one of the two.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from torchspec.trainer.commands.serve_command import serve_command_for
from torchspec.trainer.config import load_config
from torchspec.trainer.engine.fleet import VllmServer
from torchspec.trainer.engine.launch import vllm_available

from e2e_helpers import CONFIGS, FAST

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not vllm_available() and os.environ.get("TORCHSPEC_REQUIRE_ENGINE") != "1",
        reason="vLLM is not installed (hatch run engine:integration runs these)",
    ),
]

STEPS = 8
RUN = [*FAST, f"training.max_steps={STEPS}", "training.global_batch_size=8", "training.micro_batch_size=2"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, default_target):
    root = tmp_path_factory.mktemp("fleet")
    states = root / "states"
    config = load_config(CONFIGS["llama"], [*RUN, f"target.states_dir={states}"])
    servers = []
    try:
        for index in range(2):
            port = _free_port()
            command = serve_command_for(config, port=port, host="127.0.0.1")
            servers.append(VllmServer(command, root / f"server{index}.log", f"http://127.0.0.1:{port}"))
        yield servers
    finally:
        for server in servers:
            server.stop()


def _torchrun(output_dir, *overrides, port: int) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(port),
        "-m",
        "torchspec.trainer.cli",
        "train",
        "--config",
        str(CONFIGS["llama"]),
        *RUN,
        f"training.output_dir={output_dir}",
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen) -> None:
    output, _ = process.communicate(timeout=1200)
    assert process.returncode == 0, output[-4000:]


def _losses(output_dir) -> list[float]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r.get("split") == "train"]


@pytest.fixture(scope="module")
def in_process_losses(tmp_path_factory):
    out = tmp_path_factory.mktemp("in-process") / "run"
    _finish(_torchrun(out, port=_free_port()))
    return _losses(out)


def _assert_same(losses, expected):
    assert len(losses) == len(expected) == STEPS
    for step, (got, want) in enumerate(zip(losses, expected), 1):
        assert abs(got - want) <= 1e-5 * abs(want), f"step {step}: loss {got} vs {want} in process"


def test_two_servers_feed_two_ranks_with_the_in_process_losses(fleet, in_process_losses, tmp_path):
    urls = json.dumps([server.url for server in fleet])
    _finish(_torchrun(tmp_path / "run", "target.backend=fleet", f"target.servers={urls}", port=_free_port()))
    _assert_same(_losses(tmp_path / "run"), in_process_losses)


def test_a_server_killed_mid_run_does_not_stop_training(fleet, in_process_losses, tmp_path):
    # Kills one of the module's servers (the last test of the module to use them): a third server
    # would cost another engine start.
    doomed, survivor = fleet
    urls = json.dumps([doomed.url, survivor.url])
    out = tmp_path / "run"
    process = _torchrun(
        out, "target.backend=fleet", f"target.servers={urls}", "target.request_timeout_s=30", port=_free_port()
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.5)
    doomed.kill()
    _finish(process)
    _assert_same(_losses(out), in_process_losses)
