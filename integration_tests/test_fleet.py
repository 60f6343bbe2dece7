"""target.backend=fleet with real ``vllm serve`` states servers (the default tiny target, CPU):
two servers feed a two-rank torchrun (gloo) with the per-step losses of the same two-rank run on the
in-process target, and keep doing so when one server is killed mid-run; a server the trainer
started itself (target.start_servers) is started again when killed, with the same losses.

Two servers start once for the module (each an API server and an engine core: about a minute on
2 cores); the two fleet runs and the in-process reference run one after the other, and the last
test kills one of the two.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from torchspec.trainer.config import load_config
from torchspec.trainer.engine.launch import vllm_available
from torchspec.trainer.engine.servers import VllmServer
from torchspec.trainer.targets.fleet_servers import serve_command_for

from e2e_helpers import CONFIGS, FAST, free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not vllm_available() and os.environ.get("TORCHSPEC_REQUIRE_ENGINE") != "1",
        reason="vLLM is not installed (hatch run engine:integration runs these)",
    ),
]

STEPS = 8
RUN = [*FAST, f"training.max_steps={STEPS}", "training.global_batch_size=8", "training.micro_batch_size=2"]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, default_target):
    root = tmp_path_factory.mktemp("fleet")
    states = root / "states"
    config = load_config(CONFIGS["llama"], [*RUN, f"target.states_dir={states}"])
    servers = []
    try:
        for index in range(2):
            port = free_port()
            command = serve_command_for(config, port=port, host="127.0.0.1")
            url = f"http://127.0.0.1:{port}"
            servers.append(VllmServer(command, root / f"server{index}.log", url, wait=False))
        for server in servers:  # started side by side: a server's start is mostly one core's work
            server.wait_ready()
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
    _finish(_torchrun(out, port=free_port()))
    return _losses(out)


def _assert_same(losses, expected):
    assert len(losses) == len(expected) == STEPS
    for step, (got, want) in enumerate(zip(losses, expected), 1):
        assert abs(got - want) <= 1e-5 * abs(want), f"step {step}: loss {got} vs {want} in process"


def test_two_servers_feed_two_ranks_with_the_in_process_losses(fleet, in_process_losses, tmp_path):
    urls = json.dumps([server.url for server in fleet])
    _finish(_torchrun(tmp_path / "run", "target.backend=fleet", f"target.servers={urls}", port=free_port()))
    _assert_same(_losses(tmp_path / "run"), in_process_losses)


def test_a_server_killed_mid_run_does_not_stop_training(fleet, in_process_losses, tmp_path):
    # Kills one of the module's servers (the last test of the module to use them): a third server
    # would cost another engine start.
    doomed, survivor = fleet
    urls = json.dumps([doomed.url, survivor.url])
    out = tmp_path / "run"
    process = _torchrun(
        out, "target.backend=fleet", f"target.servers={urls}", "target.request_timeout_s=30", port=free_port()
    )
    _after_two_steps(out, process)
    doomed.kill()
    _finish(process)
    _assert_same(_losses(out), in_process_losses)


def _mooncake_unavailable() -> str | None:
    try:
        from mooncake.store import MooncakeDistributedStore  # noqa: F401
    except ImportError as err:
        return f"{type(err).__name__}: {err}"
    if not (Path(sys.executable).parent / "mooncake_master").is_file():
        return "no mooncake_master beside this python"
    return None


@pytest.fixture
def mooncake_master(tmp_path):
    """A Mooncake master on free ports for the test's store (TCP on localhost)."""
    port = free_port()
    log = open(tmp_path / "mooncake_master.log", "w")
    master = subprocess.Popen(
        [str(Path(sys.executable).parent / "mooncake_master"), f"-rpc_port={port}", f"-metrics_port={free_port()}"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    time.sleep(1)
    assert master.poll() is None, (tmp_path / "mooncake_master.log").read_text()[-2000:]
    yield f"127.0.0.1:{port}"
    master.terminate()
    master.wait(timeout=30)
    log.close()


# The states travel through a Mooncake store (no shared folder) where mooncake-transfer-engine loads
# here (it needs libibverbs.so.1 even for TCP), through files otherwise: the test says which.
TRANSPORT = "mooncake" if _mooncake_unavailable() is None else "file"


def test_a_server_the_trainer_started_is_started_again_when_killed(in_process_losses, tmp_path, request):
    """target.start_servers=1: rank 0 starts the only states server, both ranks train from it; it
    is SIGKILLed after step 2, the trainer starts it again, the ranks wait for it and finish with
    the uninterrupted losses; the server is gone once training ends. The states travel by
    TRANSPORT: through a Mooncake store, the server's own segment lost with it."""
    out = tmp_path / "run"
    transport = [f"target.transport={TRANSPORT}"]
    if TRANSPORT == "mooncake":
        master = request.getfixturevalue("mooncake_master")
        segment = 256 * 2**20  # each client's share of the store, and its staging buffer
        transport.append(
            f"target.mooncake={{master_server_address: '{master}', global_segment_size: {segment}, "
            f"local_buffer_size: {segment}}}"
        )
    else:
        print(f"Mooncake not available here ({_mooncake_unavailable()}): the states travel by file")
    process = _torchrun(
        out,
        "target.backend=fleet",
        "target.start_servers=1",
        f"target.server_port={free_port()}",
        *transport,
        port=free_port(),
    )
    _after_two_steps(out, process)
    (status_path,) = (out / "servers").glob("*/servers.json")
    (server,) = json.loads(status_path.read_text())
    os.killpg(server["pid"], signal.SIGKILL)
    _finish(process)
    _assert_same(_losses(out), in_process_losses)
    (restarted,) = json.loads(status_path.read_text())
    assert restarted["restarts"] == 1 and restarted["pid"] != server["pid"]
    assert "started again after exit code -9" in Path(restarted["log"]).read_text()
    with pytest.raises(ProcessLookupError):  # stopped with the run (a zombie would still be reaped by init)
        for _ in range(100):
            os.kill(restarted["pid"], 0)
            time.sleep(0.1)


def _after_two_steps(out, process) -> None:
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            return
        time.sleep(0.5)
    raise AssertionError(f"no second step within the time: {process.communicate()[0][-3000:]}")
