"""A vLLM judge server: the target served with an EAGLE-3 draft whose weights are replaced before
each measurement (``engine.draft_reload``), so that a training run can ask what the engine accepts of
the draft as trained so far without loading the target again.

Either started here (:class:`JudgeServer` with ``start=True``: at the first measurement, with the
draft folder its command names; started again when it exits) or started by the user at ``url``
(waited for at the first measurement). :meth:`JudgeServer.judge` never raises for an engine's fault:
it returns the run, or why there is none, and the caller decides what a failure means.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

from torchspec.trainer.engine.draft_reload import DEV_MODE_ENV, reload_draft
from torchspec.trainer.engine.launch import EngineError, EngineRun
from torchspec.trainer.engine.served import run_served
from torchspec.trainer.engine.servers import VllmServer, wait_until_serving

__all__ = ["JudgeServer"]

logger = logging.getLogger("torchspec.trainer")


class JudgeServer:
    """The judge at ``url`` (``command``: how it starts; ``start``: whether this process starts it,
    on ``devices``, logging to ``log_path``)."""

    def __init__(
        self,
        command: list[str],
        url: str,
        log_path: str | os.PathLike,
        *,
        start: bool,
        devices: str | None = None,
        start_timeout_s: float = 900.0,
        request_timeout_s: float = 120.0,
    ):
        self.command, self.url, self.log_path = command, url.rstrip("/"), Path(log_path)
        self.start, self.devices = start, devices
        self.start_timeout_s, self.request_timeout_s = start_timeout_s, request_timeout_s
        self.server: VllmServer | None = None
        self.answered = False

    @property
    def command_line(self) -> str:
        """The command as a shell line, with the environment it needs."""
        from torchspec.trainer.engine.fleet import format_command

        return " ".join(f"{key}={value}" for key, value in DEV_MODE_ENV.items()) + " " + format_command(self.command)

    def judge(
        self, folder: str | os.PathLike, prompts: list[list[int]], max_new_tokens: int, num_draft_tokens: int
    ) -> tuple[EngineRun | None, str | None]:
        """Load the serving folder ``folder`` into the judge's draft and decode ``prompts`` (greedy, EOS
        ignored, all at once): the run with each prompt's counts, or None and why."""
        try:
            if self.start and self.server is None:
                self.server = VllmServer(
                    self.command,
                    self.log_path,
                    self.url,
                    self.start_timeout_s,
                    devices=self.devices,
                    env=DEV_MODE_ENV,
                )
            elif not self.start and not self.answered:  # time to start it with the command the run logged
                hint = "start it with the command logged at the start"
                wait_until_serving([self.url], self.start_timeout_s, "the judge server", hint)
            try:
                run = self._run(folder, prompts, max_new_tokens, num_draft_tokens)
            except EngineError:
                if self.server is None or not _exited(self.server):
                    raise
                code = self.server.process.returncode
                logger.warning(f"the judge server {self.url} exited (code {code}); starting it again")
                self.server.restart()
                self.server.wait_ready()
                run = self._run(folder, prompts, max_new_tokens, num_draft_tokens)
        except EngineError as err:
            return None, str(err)
        self.answered = True
        return run, None

    def _run(self, folder, prompts: list[list[int]], max_new_tokens: int, num_draft_tokens: int) -> EngineRun:
        reload_draft(self.url, folder)
        run = run_served(
            self.url,
            prompts,
            max_new_tokens,
            num_draft_tokens=num_draft_tokens,
            timeout_s=self.request_timeout_s,  # a hung judge costs one measurement, not the run
        )
        if len(run.prompt_rounds) != len(prompts):
            raise EngineError(
                f"the judge server {self.url} reports no per-request speculative decoding counts; start it with "
                "--per-request-spec-decode-metrics summary"
            )
        return run

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


def _exited(server: VllmServer, grace_s: float = 10.0) -> bool:
    """Whether the server has exited, waiting ``grace_s`` for one that is going down (a request it
    failed may reach us before its process ends)."""
    try:
        server.process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        return False
    return True
