"""Integration: the same run on 1 and 2 processes (torchrun, gloo), and resuming across world sizes."""

import json
import subprocess
import sys

import pytest

from torchspec.trainer.config import load_config
from torchspec.trainer.loop.checkpoint import list_checkpoints
from torchspec.trainer.loop.run import train

from trainer_test_helpers import read_metrics, small_overrides, torchrun

EXTRA = {"checkpoint.save_interval": 4, "metrics.eval_interval": 4}


@pytest.fixture(scope="module")
def one_and_two_processes(assets, tmp_path_factory):
    one = tmp_path_factory.mktemp("one_process")
    train(load_config(None, small_overrides(assets, one, **EXTRA)))
    two = tmp_path_factory.mktemp("two_processes")
    # The target sharded over the two ranks too: it must compute what the whole one computes.
    result = torchrun(small_overrides(assets, two, **EXTRA, **{"training.shard_target": "true"}))
    assert result.returncode == 0, result.stderr[-3000:]
    return one, two, result


def test_two_processes_match_one_process(one_and_two_processes):
    one, two, result = one_and_two_processes
    assert "world size 2 on cpu" in result.stdout
    for split in ("train", "eval"):
        expected, got = read_metrics(one, split), read_metrics(two, split)
        assert sorted(got) == sorted(expected)
        for step in expected:
            # Same global batch, same normaliser: only the summation order of floats differs.
            assert got[step]["counted_positions"] == expected[step]["counted_positions"]
            assert got[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-5)
            assert got[step]["loss_per_position"] == pytest.approx(expected[step]["loss_per_position"], rel=1e-5)
            assert got[step]["acc_per_position"] == pytest.approx(expected[step]["acc_per_position"], abs=0.01)
            if split == "train":
                assert got[step]["tokens"] == expected[step]["tokens"]
                assert got[step]["grad_norm"] == pytest.approx(expected[step]["grad_norm"], rel=1e-4)
    assert [s for s, _ in list_checkpoints(two)] == [4, 8]
    # One rank-0 metrics file, RNG states of both ranks in each checkpoint.
    assert (two / "iter_0000004" / "rng_state_rank1.pt").is_file()


def test_resume_on_a_different_world_size(assets, one_and_two_processes, tmp_path):
    one, two, _ = one_and_two_processes
    resumed = train(
        load_config(
            None, small_overrides(assets, tmp_path, **EXTRA, **{"checkpoint.resume": str(two / "iter_0000004")})
        )
    )
    assert [r["step"] for r in resumed.train_history] == [5, 6, 7, 8]
    expected = read_metrics(one)
    for record in resumed.train_history:
        assert record["loss"] == pytest.approx(expected[record["step"]]["loss"], rel=1e-5)


@pytest.mark.slow
def test_a_run_killed_at_any_moment_resumes_to_the_same_losses(assets, one_and_two_processes, tmp_path):
    """SIGKILL while training (saving every step, so the kill often lands inside a save), then resume."""
    import signal
    import time

    one, _, _ = one_and_two_processes
    output_dir = tmp_path / "killed"
    args = [
        sys.executable,
        "-m",
        "torchspec.trainer.cli",
        "train",
        *small_overrides(assets, output_dir, **{**EXTRA, "checkpoint.save_interval": 1}),
    ]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = output_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 4:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert list_checkpoints(output_dir), "the run died before its first checkpoint"
    killed_at = max(s for s, _ in list_checkpoints(output_dir))
    assert killed_at < 8, "the run finished before it was killed; nothing was tested"

    train(
        load_config(
            None,
            small_overrides(
                assets, output_dir, **{**EXTRA, "checkpoint.save_interval": 1, "checkpoint.resume": "auto"}
            ),
        )
    )
    expected, got = read_metrics(one), read_metrics(output_dir)
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-6), step


def test_real_acceptance_on_two_processes_decides_as_one_process(assets, tmp_path):
    """FSDP2: the draft's shards are gathered on every rank, rank 0 decodes, the result is broadcast,
    so both ranks take the same best-checkpoint and early-stop decisions (a rank saving alone would
    leave the other waiting at the save's barrier) and they are the one-process run's."""
    overrides = {
        **EXTRA,
        "metrics.real_acceptance_prompts": 3,
        "metrics.real_acceptance_max_new_tokens": 6,
        "metrics.real_acceptance_interval": 2,
        "training.early_stop_patience": 1,
    }
    one, two = tmp_path / "one", tmp_path / "two"
    train(load_config(None, small_overrides(assets, one, **overrides)))
    result = torchrun(small_overrides(assets, two, **overrides))
    assert result.returncode == 0, result.stderr[-3000:]
    expected, got = read_metrics(one, "acceptance"), read_metrics(two, "acceptance")
    assert sorted(got) == sorted(expected)
    for step in expected:
        assert got[step]["real_acceptance_length"] == pytest.approx(expected[step]["real_acceptance_length"], abs=0.2)
    assert [s for s, _ in list_checkpoints(two)] == [s for s, _ in list_checkpoints(one)]
    best_one, best_two = (json.loads((run / "best.json").read_text()) for run in (one, two))
    assert best_two["checkpoint"] == best_one["checkpoint"] and best_two["metric"] == "real_acceptance_length"
