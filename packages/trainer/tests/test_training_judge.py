"""Real acceptance during training judged by a vLLM server (loop/served_acceptance.py,
engine/draft_reload.py), against a fake judge (trainer_test_helpers.FakeVllmServer):

* before each measurement the judge's draft is replaced by the weights as trained at that step
  (those of that step's checkpoint), and its prefix cache dropped;
* what the judge counts is logged as real acceptance (with the judge's name) and picks best.json;
* a judge that fails after a measurement succeeded skips that measurement, and training goes on;
  one that cannot reload, or never answers, at the first measurement stops the run with what to fix;
* a judge the trainer started is started again when it exits, and measures on;
* the config: one judge at a time, a URL that is one, and real acceptance for targets outside the
  process only with a judge.
The real judge (vLLM serving a fleet run's target) is exercised in integration_tests/test_judge.py.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from torchspec.draft_models import TrainingCheckpoint
from torchspec.trainer.config import ConfigError, load_config, real_acceptance_off
from torchspec.trainer.engine import draft_reload, launch
from torchspec.trainer.engine.draft_reload import WORKER_EXTENSION, judge_serve_command
from torchspec.trainer.engine.launch import EngineError
from torchspec.trainer.engine.served import run_served
from torchspec.trainer.loop.run import train

from trainer_test_helpers import FakeVllmServer, read_metrics, small_overrides, torchrun

MEASURED = {
    "metrics.real_acceptance_prompts": 3,
    "metrics.real_acceptance_max_new_tokens": 6,
    "metrics.real_acceptance_interval": 2,
    "checkpoint.save_interval": 2,
}


@pytest.fixture
def judge():
    started = []

    def start(**kwargs):
        started.append(FakeVllmServer(4, per_request=True, **kwargs))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def run(assets, output_dir, **extra):
    return train(load_config(None, small_overrides(assets, output_dir, **MEASURED, **extra)))


def test_each_measurement_judges_the_draft_as_trained_at_that_step(assets, tmp_path, judge, caplog):
    server = judge(rounds=3, accepted_after_reload=[1, 3, 2, 0])
    with caplog.at_level("INFO", logger="torchspec.trainer"):
        run(assets, tmp_path, **{"metrics.judge_url": server.url})
    real = read_metrics(tmp_path, "acceptance")
    assert sorted(real) == [2, 4, 6, 8]
    assert [real[step]["real_acceptance_length"] for step in (2, 4, 6, 8)] == [1 + 1 / 3, 2.0, 1 + 2 / 3, 1.0]
    assert all(real[step]["judge"] == f"vllm 0.32.0-fake at {server.url}" for step in real)
    assert all(real[step]["num_prompts"] == 3 and real[step]["max_new_tokens"] == 6 for step in real)
    # Each reload carried that step's weights: those its checkpoint holds.
    assert len(server.reloads) == 4 and server.prefix_cache_resets == 4
    for step, loaded in zip((2, 4, 6, 8), server.reloads):
        checkpoint = TrainingCheckpoint.open(tmp_path / f"iter_{step:07d}")
        for name, tensor in loaded.items():
            torch.testing.assert_close(tensor, checkpoint.load_tensor(name).to(tensor.dtype), rtol=0, atol=0)
    assert not torch.equal(server.reloads[0]["fc.weight"], server.reloads[-1]["fc.weight"])
    best = json.loads((tmp_path / "best.json").read_text())
    assert (best["checkpoint"], best["metric"], best["value"]) == ("iter_0000004", "real_acceptance_length", 2.0)
    # The run says how to start the judge: with its first draft, the reload extension, dev mode.
    (line,) = [r.getMessage() for r in caplog.records if "metrics.judge_url" in r.getMessage()]
    assert str(tmp_path / "judge" / "initial") in line and WORKER_EXTENSION in line
    assert "VLLM_SERVER_DEV_MODE=1" in line and (tmp_path / "judge" / "initial" / "config.json").is_file()


def test_two_ranks_send_the_whole_draft_and_decide_together(assets, tmp_path, judge):
    """FSDP2 on two ranks: the judge gets the gathered weights (both shards), and both ranks take the
    judged result, a skipped measurement too, for best.json and checkpoints."""
    server = judge(rounds=3, accepted_after_reload=[1, 3, 2], failing_reloads=(2,))
    result = torchrun(small_overrides(assets, tmp_path, **MEASURED, **{"metrics.judge_url": server.url}))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world size 2 on cpu" in result.stdout
    real = read_metrics(tmp_path, "acceptance")
    assert {step: real[step]["real_acceptance_length"] for step in real} == {2: 1 + 1 / 3, 4: 2.0, 8: 1 + 2 / 3}
    assert len(server.reloads) == 4
    for step, loaded in zip((2, 4, 6, 8), server.reloads):
        checkpoint = TrainingCheckpoint.open(tmp_path / f"iter_{step:07d}")
        for name, tensor in loaded.items():
            torch.testing.assert_close(tensor, checkpoint.load_tensor(name).to(tensor.dtype), rtol=0, atol=0)
    assert json.loads((tmp_path / "best.json").read_text())["checkpoint"] == "iter_0000004"


def test_a_failed_measurement_after_a_good_one_is_skipped(assets, tmp_path, judge, caplog):
    server = judge(failing_reloads=(1,))
    with caplog.at_level("INFO", logger="torchspec.trainer"):
        result = run(assets, tmp_path, **{"metrics.judge_url": server.url})
    assert result.steps == 8
    assert sorted(read_metrics(tmp_path, "acceptance")) == [2, 6, 8]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "skipped" in r.getMessage()]
    assert "real acceptance skipped at this step" in warning and "the worker died" in warning


def test_a_judge_that_cannot_reload_stops_the_run_at_its_first_measurement(assets, tmp_path, judge):
    server = judge(dev_mode=False)
    with pytest.raises(ConfigError, match="could not reload the draft") as raised:
        run(assets, tmp_path, **{"metrics.judge_url": server.url})
    assert f"--worker-extension-cls {WORKER_EXTENSION}" in str(raised.value)
    assert "VLLM_SERVER_DEV_MODE=1" in str(raised.value)


def test_a_judge_that_never_answers_stops_the_run_naming_it(assets, tmp_path):
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(ConfigError, match=f"the judge server {url} did not answer within 2 s"):
        run(assets, tmp_path, **{"metrics.judge_url": url, "target.engine_timeout_s": 2})


def test_a_judge_without_per_request_counts_is_refused(assets, tmp_path):
    server = FakeVllmServer(4, per_request=False)
    try:
        with pytest.raises(ConfigError, match="--per-request-spec-decode-metrics summary"):
            run(assets, tmp_path, **{"metrics.judge_url": server.url})
    finally:
        server.stop()


def test_per_request_counts_are_read_when_the_server_reports_them():
    server = FakeVllmServer(2, rounds=3, accepted=2, per_request=True)
    try:
        run = run_served(server.url, [[5, 6], [9]], 6, num_draft_tokens=2)
    finally:
        server.stop()
    assert run.prompt_rounds == [3, 3] and run.prompt_accepted == [2, 2]
    assert sum(run.prompt_accepted) == run.num_accepted_tokens  # the same counts as /metrics'


def test_a_judge_the_trainer_started_is_started_again_when_it_exits(assets, tmp_path, monkeypatch):
    script = tmp_path / "fake_judge.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys, time
            sys.path.insert(0, {str(Path(__file__).parent)!r})
            from trainer_test_helpers import FakeVllmServer
            first = sys.argv[2] == "first"
            FakeVllmServer(4, per_request=True, port=int(sys.argv[1]), exit_at_reload=1 if first else None)
            time.sleep(600)
            """
        )
    )
    marker = tmp_path / "started-once"

    def fake_command(*args, port, **kwargs):
        # First start: a judge that dies at its second reload; the start after it: a healthy one.
        return [sys.executable, "-c", _first_then_healthy(script, marker, port)]

    monkeypatch.setattr(draft_reload, "judge_serve_command", fake_command)
    monkeypatch.setattr(launch, "vllm_available", lambda: True)  # the unit environments have no vLLM
    port = _free_port()
    result = run(assets, tmp_path, **{"metrics.start_judge": True, "metrics.judge_port": port})
    assert result.steps == 8
    assert sorted(read_metrics(tmp_path, "acceptance")) == [2, 4, 6, 8]  # step 4 measured after the restart
    log = (tmp_path / "judge" / "server.log").read_text()
    assert "started again after exit code 1" in log
    with pytest.raises(OSError):  # stopped with the run
        import urllib.request

        urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)


def _first_then_healthy(script: Path, marker: Path, port: int) -> str:
    return (
        "import os, pathlib, subprocess, sys\n"
        f"marker = pathlib.Path({str(marker)!r})\n"
        "which = 'again' if marker.exists() else 'first'\n"
        "marker.touch()\n"
        f"os.execv(sys.executable, [sys.executable, {str(script)!r}, '{port}', which])\n"
    )


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_judge_to_start_without_vllm_is_refused_before_step_one(assets, tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "vllm_available", lambda: False)
    monkeypatch.delenv("TORCHSPEC_ENGINE_PYTHON", raising=False)
    with pytest.raises(ConfigError, match="metrics.start_judge: vLLM is not installed in this environment"):
        run(assets, tmp_path, **{"metrics.start_judge": True})
    assert not list(tmp_path.glob("iter_*")) and not (tmp_path / "metrics.jsonl").exists()


def test_one_judge_at_a_time_and_a_url_that_is_one(assets, tmp_path):
    both = {"metrics.judge_url": "http://127.0.0.1:8090", "metrics.start_judge": True}
    with pytest.raises(ConfigError, match="metrics.judge_url and metrics.start_judge are both set"):
        load_config(None, small_overrides(assets, tmp_path, **both))
    with pytest.raises(ConfigError, match="give the server's http://HOST:PORT"):
        load_config(None, small_overrides(assets, tmp_path, **{"metrics.judge_url": "judge-node"}))
    with pytest.raises(ConfigError, match="metrics.judge_port"):
        load_config(None, small_overrides(assets, tmp_path, **{"metrics.judge_port": 70000}))


def test_a_target_outside_the_process_is_measured_only_with_a_judge(assets, tmp_path):
    fleet = {**MEASURED, "target.backend": "fleet", "target.servers": "[http://127.0.0.1:8000]"}
    fleet["target.states_dir"] = str(tmp_path / "states")
    off = real_acceptance_off(load_config(None, small_overrides(assets, tmp_path, **fleet)))
    assert off is not None and "metrics.start_judge=true" in off and "metrics.judge_url" in off
    judged = load_config(None, small_overrides(assets, tmp_path, **fleet, **{"metrics.start_judge": True}))
    assert real_acceptance_off(judged) is None
    # The end-of-run speculative eval is still the in-process evaluator's: off without the target.
    assert real_acceptance_off(judged, "speculative_eval_prompts") is not None


def test_the_judge_command_reloads_and_counts_per_request(tmp_path):
    command = judge_serve_command(
        tmp_path / "target", tmp_path / "draft", num_draft_tokens=3, engine_args={"tensor_parallel_size": 8}
    )
    text = " ".join(command)
    assert f"--worker-extension-cls {WORKER_EXTENSION}" in text
    assert "--per-request-spec-decode-metrics summary" in text and "--tensor-parallel-size 8" in text
    speculative = json.loads(command[command.index("--speculative-config") + 1])
    assert speculative == {"method": "eagle3", "model": str(tmp_path / "draft"), "num_speculative_tokens": 3}


def test_reload_errors_name_the_server(judge, tmp_path):
    from torchspec.trainer.engine.draft_reload import reload_draft

    with pytest.raises(EngineError, match="could not reload the draft"):
        reload_draft("http://127.0.0.1:1", tmp_path)
