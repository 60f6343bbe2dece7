"""The newcomer's chain: train -> export -> evaluate -> check (-> verify), each later command with no
arguments, run as the hatch scripts run them (`python -m ...` in a fresh working directory).

Only `train` gets overrides, to keep CI short (`training.max_steps`); the commands after it find
that run through `outputs/.last_run`, exactly as after a full default run.
"""

import json
import os
import subprocess
import sys

import pytest

from torchspec.trainer.engine.launch import vllm_available

pytestmark = pytest.mark.slow

SHORT = [
    "training.max_steps=12",
    "data.max_seq_length=256",
    "metrics.speculative_eval_prompts=0",
    "metrics.eval_interval=0",
]


def _run(cwd, *args, expect=0):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=1200
    )
    assert completed.returncode == expect, (args, completed.stdout[-2000:], completed.stderr[-2000:])
    return completed.stdout + completed.stderr


@pytest.mark.parametrize("config", [None, "configs/default_mla.yaml"])
def test_the_commands_chain_without_arguments(tmp_path, default_target, config):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    chosen = ["--config", os.path.join(repo, config)] if config else []
    run_dir = "outputs/default_mla" if config else "outputs/default_llama"

    train_log = _run(tmp_path, "torchspec.trainer.cli", "train", *chosen, *SHORT)
    assert "next: hatch run converter:export" in train_log
    assert (tmp_path / run_dir / "training_config.yaml").is_file()

    export_log = _run(tmp_path, "torchspec.converter.cli", "export")
    exported = tmp_path / f"{run_dir}_hf"
    assert f"-> {run_dir}_hf" in export_log and (exported / "model.safetensors").is_file()
    # Real acceptance measured at the last step picked the best checkpoint, which export takes.
    assert f"exporting the best checkpoint of {run_dir}: iter_0000012 (best.json: real_acceptance_length" in export_log

    evaluate_log = _run(tmp_path, "torchspec.trainer.cli", "evaluate")
    assert f"from the eval split of {run_dir} (data.eval_split 0.1 of builtin:sample-conversations" in evaluate_log
    assert json.loads((exported / "speculative_eval.json").read_text())["identical_to_target"] is True

    check_log = _run(tmp_path, "torchspec.converter.cli", "check")
    assert f"{run_dir}_hf: 0 error(s)" in check_log

    if vllm_available() and not config:  # the MLA chain's export is served by vLLM in test_engine.py
        _run(tmp_path, "torchspec.trainer.cli", "verify")
        report = json.loads((exported / "engine_verify.json").read_text())
        assert report["engine_output_identical_with_and_without_draft"]
