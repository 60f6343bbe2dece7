"""Two-process FSDP2 training (torchrun, gloo on CPU) feeds the same export path as one process:
the exported weights equal the one-process run's (which vLLM serves, test_engine.py)."""

import os
import subprocess
import sys

import pytest
import torch

from e2e_helpers import CONFIGS, FAST, export, load_weights, train_default

pytestmark = pytest.mark.slow

STEPS = 6


def test_two_process_training_exports_the_one_process_weights(tmp_path):
    overrides = [*FAST, f"training.max_steps={STEPS}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        "29517",
        "-m",
        "torchspec.trainer.cli",
        "train",
        "--config",
        str(CONFIGS["llama"]),
        *overrides,
        f"training.output_dir={tmp_path / 'two'}",
    ]
    completed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    train_default("llama", tmp_path / "one", STEPS)

    two = export(tmp_path / "two", tmp_path / "two_hf")
    one = export(tmp_path / "one", tmp_path / "one_hf")
    a, b = load_weights(one), load_weights(two)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
