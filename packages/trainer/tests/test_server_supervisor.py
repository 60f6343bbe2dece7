"""States servers the trainer starts itself (``target.start_servers``), without vLLM: the
supervisor runs a stand-in server (a small HTTP server answering GET /v1/models) under the same
process handling as ``vllm serve``.

* the servers start side by side and the supervisor returns once all answer;
* a server that exits (SIGKILL) is started again on its port, up to ``max_restarts`` times, and
  ``servers.json`` says so;
* a server that exits before it is ready is one line naming its log, and nothing is left running;
* closing the supervisor, or SIGKILL of the process that started the servers, stops them;
* the config mistakes are one line each, before anything starts.
The real servers are exercised in integration_tests/test_fleet.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from torchspec.trainer.config import ConfigError, load_config
from torchspec.trainer.engine.launch import EngineError
from torchspec.trainer.engine.servers import ServerSupervisor, wait_until_serving

STAND_IN = """
import http.server, json, sys
class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args): pass
    def do_GET(self):
        body = json.dumps({"data": [{"id": "stand-in"}]}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _command(port: int) -> list[str]:
    return [sys.executable, "-c", STAND_IN, str(port)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not reaped yet) counts as gone.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split()[2] != "Z"


def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.fixture
def two_servers(tmp_path):
    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    supervisor = ServerSupervisor(
        [_command(p) for p in ports], urls, tmp_path / "servers", max_restarts=1, poll_s=0.1, start_timeout_s=60
    )
    yield supervisor
    supervisor.close()


def _status(supervisor) -> list[dict]:
    return json.loads((supervisor.log_dir / "servers.json").read_text())


def test_the_servers_answer_once_started_and_say_where_they_are(two_servers):
    wait_until_serving(two_servers.urls, timeout_s=1)
    status = _status(two_servers)
    assert [entry["url"] for entry in status] == two_servers.urls
    assert all(entry["running"] and entry["restarts"] == 0 for entry in status)
    assert all(os.path.isfile(entry["log"]) for entry in status)


def test_a_server_that_exits_is_started_again_up_to_the_limit(two_servers):
    first = two_servers.servers[0]
    old_pid = first.process.pid
    first.kill()
    _wait_for(lambda: two_servers.restarts[0] == 1 and first.process.pid != old_pid)
    wait_until_serving([first.url], timeout_s=30)  # on the same port
    assert _status(two_servers)[0]["restarts"] == 1
    assert "started again after exit code -9" in first.log_path.read_text()
    first.kill()  # max_restarts=1: not again
    time.sleep(1.0)
    assert two_servers.restarts[0] == 1 and first.process.poll() is not None
    assert two_servers.servers[1].process.poll() is None  # the other one kept running


def test_a_server_that_dies_before_it_is_ready_is_one_line_and_nothing_is_left(tmp_path):
    port = free_port()
    good = _command(port)
    bad = [sys.executable, "-c", "import sys; print('no such model'); sys.exit(3)"]
    with pytest.raises(EngineError, match=r"the vLLM server http://127.0.0.1:\d+ exited \(code 3\).*server-1.log"):
        ServerSupervisor(
            [good, bad], [f"http://127.0.0.1:{port}", f"http://127.0.0.1:{free_port()}"], tmp_path, start_timeout_s=60
        )
    status = json.loads((tmp_path / "servers.json").read_text())
    _wait_for(lambda: not _alive(status[0]["pid"]))


def test_closing_stops_every_server(two_servers):
    pids = [server.process.pid for server in two_servers.servers]
    two_servers.close()
    assert not any(_alive(pid) for pid in pids)


def test_servers_do_not_outlive_a_killed_trainer(tmp_path):
    port = free_port()
    starter = f"""
import sys, time
from torchspec.trainer.engine.servers import ServerSupervisor
ServerSupervisor([{_command(port)!r}], ["http://127.0.0.1:{port}"], {str(tmp_path)!r}, start_timeout_s=60)
print("ready", flush=True)
time.sleep(600)
"""
    trainer = subprocess.Popen([sys.executable, "-c", starter], stdout=subprocess.PIPE, text=True)
    assert trainer.stdout.readline().strip() == "ready"
    server_pid = json.loads((tmp_path / "servers.json").read_text())[0]["pid"]
    assert _alive(server_pid)
    trainer.send_signal(signal.SIGKILL)
    trainer.wait()
    _wait_for(lambda: not _alive(server_pid), timeout=10)


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["target.start_servers=2"], "target.start_servers applies to target.backend=fleet, not transformers"),
        (
            ["target.backend=fleet", "target.start_servers=1", "target.servers=[http://a:8000]"],
            "target.start_servers and target.servers are both set",
        ),
        (
            ["target.backend=fleet", "target.start_servers=2", "target.server_devices=['0,1']"],
            "lists 1 device groups for target.start_servers=2",
        ),
        (["target.backend=fleet", "target.start_servers=-1"], "target.start_servers must be a whole number >= 0"),
        (["target.backend=fleet", "target.start_servers=2", "target.server_port=65535"], "leave room for 2 ports"),
    ],
)
def test_started_server_mistakes_are_one_line(overrides, words):
    with pytest.raises(ConfigError, match=words):
        load_config(None, overrides)
