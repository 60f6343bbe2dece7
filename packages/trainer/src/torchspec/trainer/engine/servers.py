"""vLLM servers this process starts and keeps running.

:class:`VllmServer` is one ``vllm serve`` child process (its own process group, its output in a log
file), ready once its OpenAI API answers. It ends with its parent: on Linux the kernel sends it
SIGTERM when the thread that started it ends, so a trainer killed with SIGKILL leaves no server
behind (vLLM's server stops its engine core on SIGTERM).

:class:`ServerSupervisor` keeps the states servers a trainer started (``target.start_servers``)
running: one that exits is started again, with the same command, port and devices, up to
``max_restarts`` times; the fleet's clients set it aside meanwhile and send its requests to the
others (or wait for it, up to ``target.engine_timeout_s``, when it was the only one). What each
server is doing is in ``servers.json`` beside their logs.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from torchspec.draft_models.atomic import write_file_atomic
from torchspec.trainer.engine.http import get_json
from torchspec.trainer.engine.launch import EngineError, engine_environment

__all__ = ["ServerSupervisor", "VllmServer", "wait_until_serving"]

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _answers(url: str) -> bool:
    try:
        get_json(url + "/v1/models", timeout=5)
        return True
    except (OSError, ValueError):
        return False


def wait_until_serving(
    urls: list[str], timeout_s: float, what: str = "the states servers", hint: str = "logs in <output_dir>/servers/"
) -> None:
    """Wait until every server in ``urls`` answers (servers another rank of this node starts, or a
    judge the user is starting); else an error naming ``what`` did not answer, with ``hint``."""
    deadline = time.monotonic() + timeout_s
    waiting = list(urls)
    while waiting:
        waiting = [url for url in waiting if not _answers(url)]
        if waiting and time.monotonic() > deadline:
            raise EngineError(
                f"{what} {', '.join(waiting)} did not answer within {timeout_s:.0f} s (target.engine_timeout_s); {hint}"
            )
        if waiting:
            time.sleep(1)


class VllmServer:
    """One vLLM server started here as a child process; stopped on :meth:`stop` or when used as a
    context manager. ``devices``: its ``CUDA_VISIBLE_DEVICES``; ``env``: more environment variables.
    ``wait``: return once it answers (else call :meth:`wait_ready`)."""

    def __init__(
        self,
        command: list[str],
        log_path: str | os.PathLike,
        url: str,
        start_timeout_s: float = 600,
        *,
        devices: str | None = None,
        env: dict[str, str] | None = None,
        wait: bool = True,
    ):
        self.command, self.url, self.log_path = command, url.rstrip("/"), Path(log_path)
        self.start_timeout_s, self.devices, self.env = start_timeout_s, devices, dict(env or {})
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        self.process = self._spawn()
        if wait:
            self.wait_ready()

    def _spawn(self) -> subprocess.Popen:
        env = engine_environment()
        if "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ:  # the in-process default is the worker's
            del env["VLLM_ENABLE_V1_MULTIPROCESSING"]  # a server steps its engine core in its own process
        if self.devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.devices
        env.update(self.env)
        return subprocess.Popen(
            self.command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EngineError(
                    f"the vLLM server {self.url} exited (code {self.process.returncode}) before it was ready "
                    f"(log: {self.log_path})"
                )
            if _answers(self.url):
                return
            time.sleep(1)
        self.stop()
        raise EngineError(
            f"the vLLM server {self.url} was not ready within {self.start_timeout_s:.0f} s (log: {self.log_path})"
        )

    def restart(self) -> None:
        """Start it again (same command, port and devices) after it exited; returns at once."""
        self._kill_group()
        self._log.write(f"\n--- torchspec: started again after exit code {self.process.returncode} ---\n")
        self._log.flush()
        self.process = self._spawn()

    def _kill_group(self) -> None:
        try:  # what is left of the process group (its engine core)
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def kill(self) -> None:
        """SIGKILL the whole server (its engine core too), as a crash would."""
        self._kill_group()
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                self.kill()
        self._kill_group()
        self._log.close()

    def __enter__(self) -> VllmServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class ServerSupervisor:
    """Start ``commands`` (one server each, listening at ``urls``; ``devices`` their
    ``CUDA_VISIBLE_DEVICES``), wait until all answer, then start again any that exits."""

    def __init__(
        self,
        commands: list[list[str]],
        urls: list[str],
        log_dir: str | os.PathLike,
        *,
        devices: list[str | None] | None = None,
        start_timeout_s: float = 900,
        max_restarts: int = 3,
        poll_s: float = 1.0,
    ):
        self.log_dir, self.max_restarts, self.poll_s = Path(log_dir), max_restarts, poll_s
        self.log_dir.mkdir(parents=True, exist_ok=True)
        devices = devices or [None] * len(commands)
        self.servers: list[VllmServer] = []
        self.restarts = [0] * len(commands)
        self._stopping = threading.Event()
        try:
            for index, (command, url, device) in enumerate(zip(commands, urls, devices)):
                log_path = self.log_dir / f"server-{index}.log"
                self.servers.append(VllmServer(command, log_path, url, start_timeout_s, devices=device, wait=False))
            self._write_status()
            for server in self.servers:  # they start side by side
                server.wait_ready()
        except BaseException:
            self.close()
            raise
        self._write_status()
        self._watcher = threading.Thread(target=self._watch, name="torchspec-server-supervisor", daemon=True)
        self._watcher.start()

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self.servers]

    def _watch(self) -> None:
        while not self._stopping.wait(self.poll_s):
            for index, server in enumerate(self.servers):
                code = server.process.poll()
                if code is None or self._stopping.is_set():
                    continue
                if self.restarts[index] >= self.max_restarts:
                    continue  # given up on: the fleet's clients use the others
                self.restarts[index] += 1
                log.warning(
                    "the states server %s exited (code %s); starting it again (restart %d of at most %d; log: %s)",
                    server.url,
                    code,
                    self.restarts[index],
                    self.max_restarts,
                    server.log_path,
                )
                server.restart()
                self._write_status()

    def _write_status(self) -> None:
        status = [
            {
                "url": server.url,
                "pid": server.process.pid,
                "devices": server.devices,
                "restarts": self.restarts[index],
                "running": server.process.poll() is None,
                "log": str(server.log_path),
                "command": server.command,
            }
            for index, server in enumerate(self.servers)
        ]
        write_file_atomic(self.log_dir / "servers.json", json.dumps(status, indent=2) + "\n")

    def close(self) -> None:
        """Stop every server (and stop watching them)."""
        self._stopping.set()
        for server in self.servers:
            server.stop()
        if self.servers:
            self._write_status()
