import io
import json

import pytest
import torch

from torchspec.trainer.config import ConfigError
from torchspec.trainer.loop.metrics import (
    JsonlWriter,
    MetricsSink,
    ProgressBar,
    TTTCounts,
    acceptance_length,
    summarize,
    ttt_counts,
)


def random_outcome(length=4, batch=3, seq=9, seed=0, all_counted=False):
    generator = torch.Generator().manual_seed(seed)
    correct = torch.rand(length, batch, seq, generator=generator) < 0.7
    counted = torch.ones_like(correct) if all_counted else torch.rand(length, batch, seq, generator=generator) < 0.8
    loss_sums = torch.rand(length, generator=generator) * 10
    return correct & counted, counted, loss_sums


def brute_force(correct, counted):
    """Per-position and conditional accuracy by walking every row's chain."""
    length, batch, seq = correct.shape
    per_position, conditional = [], []
    for k in range(length):
        n = c = cn = cc = 0
        for b in range(batch):
            for t in range(seq):
                if not counted[k, b, t]:
                    continue
                n += 1
                c += bool(correct[k, b, t])
                if all(counted[i, b, t] and correct[i, b, t] for i in range(k)):
                    cn += 1
                    cc += bool(correct[k, b, t])
        per_position.append(c / n)
        conditional.append(cc / cn if cn else 0.0)
    return per_position, conditional


def test_accuracies_match_a_row_by_row_walk():
    correct, counted, loss_sums = random_outcome()
    summary = summarize(ttt_counts(correct, counted, loss_sums), loss_decay=0.8)
    per_position, conditional = brute_force(correct, counted)
    assert summary["acc_per_position"] == pytest.approx(per_position)
    assert summary["cond_acc_per_position"] == pytest.approx(conditional)
    assert summary["cond_acc_per_position"][0] == summary["acc_per_position"][0]
    counts = counted.sum(dim=(1, 2)).double()
    assert summary["loss_per_position"] == pytest.approx((loss_sums.double() / counts).tolist())
    assert summary["loss"] == pytest.approx(sum(0.8**k * (loss_sums[k] / counts[k]).item() for k in range(4)))


def test_acceptance_length_is_the_mean_accepted_chain_plus_one():
    # With every position counted, prod_{i<=k} cond_acc_i is the share of rows whose first k+1
    # drafts are all correct, so 1 + the sum is 1 + the mean number of leading correct drafts.
    correct, counted, loss_sums = random_outcome(length=5, batch=4, seq=20, seed=3, all_counted=True)
    summary = summarize(ttt_counts(correct, counted, loss_sums), loss_decay=0.8)
    leading = torch.cumprod(correct.long(), dim=0).sum(dim=0).double()  # [B, T]
    assert summary["acceptance_length"] == pytest.approx(1 + leading.mean().item())


def test_acceptance_length_formula():
    assert acceptance_length([0.5, 0.5, 0.5]) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert acceptance_length([1.0, 1.0]) == 3.0
    assert acceptance_length([0.0, 1.0]) == 1.0


def test_counts_of_parts_add_up_to_counts_of_the_whole():
    correct, counted, loss_sums = random_outcome(batch=4)
    whole = ttt_counts(correct, counted, loss_sums)
    first = ttt_counts(correct[:, :1], counted[:, :1], loss_sums * 0.25)
    rest = ttt_counts(correct[:, 1:], counted[:, 1:], loss_sums * 0.75)
    added = first.add(rest)
    assert torch.allclose(added.as_tensor(), whole.as_tensor())
    assert torch.equal(TTTCounts.from_tensor(whole.as_tensor()).as_tensor(), whole.as_tensor())


def test_no_counted_position_gives_zero_not_nan():
    summary = summarize(TTTCounts.zeros(3), loss_decay=0.8)
    assert summary["acc_per_position"] == [0.0, 0.0, 0.0] and summary["loss"] == 0.0
    assert summary["acceptance_length"] == 1.0


def test_jsonl_lines_are_parseable_records(tmp_path):
    writer = JsonlWriter(tmp_path / "m.jsonl")
    writer.write({"step": 1, "loss": 2.5, "acc_per_position": torch.tensor([0.5, 0.25])})
    writer.write({"step": 2, "loss": 2.0})
    writer.close()
    lines = (tmp_path / "m.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "loss": 2.5, "acc_per_position": [0.5, 0.25]},
        {"step": 2, "loss": 2.0},
    ]
    appended = JsonlWriter(tmp_path / "m.jsonl", append=True)
    appended.write({"step": 3})
    appended.close()
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 3


def test_a_resumed_writer_drops_the_records_after_its_step_and_a_torn_line(tmp_path):
    """A run killed after its checkpoint at step 2 logged steps 3 and 4 and half a line; the resumed
    run (from step 2) must leave each step once."""
    path = tmp_path / "m.jsonl"
    records = [
        {"step": 1, "split": "train"},
        {"step": 2, "split": "train"},
        {"step": 2, "split": "eval"},
        {"step": 3, "split": "train"},
        {"step": 4, "split": "train"},
        {"step": 4, "split": "eval"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 5, "spl')
    writer = JsonlWriter(path, append=True, keep_through_step=2)
    writer.write({"step": 3, "split": "train", "resumed": True})
    writer.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == records[:3] + [
        {"step": 3, "split": "train", "resumed": True}
    ]
    # Nothing to drop: the file is left as it was (no rewrite).
    before = path.stat().st_mtime_ns
    JsonlWriter(path, append=True, keep_through_step=3).close()
    assert path.stat().st_mtime_ns == before and len(path.read_text().splitlines()) == 4


def test_tensorboard_without_the_package_is_a_config_error(tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="pip install tensorboard, or set metrics.tensorboard=false"):
            MetricsSink(tmp_path, tensorboard=True)
    else:
        sink = MetricsSink(tmp_path, tensorboard=True)
        sink.write({"step": 1, "loss": 1.0, "acc_per_position": [0.5]})
        sink.close()
        assert any((tmp_path / "tensorboard").iterdir())


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_draws_only_on_a_terminal():
    plain = io.StringIO()
    bar = ProgressBar(10, stream=plain)
    bar.update(3, "loss 1.0")
    bar.close()
    assert plain.getvalue() == ""

    tty = FakeTTY()
    bar = ProgressBar(10, stream=tty)
    bar.update(5, "loss 1.0")
    bar.close()  # tqdm redraws at most every 0.1 s, and always on close
    assert tty.getvalue().startswith("\r") and " 5/10 " in tty.getvalue() and "loss 1.0" in tty.getvalue()
    assert tty.getvalue().endswith("\n")
    assert ProgressBar(10, enabled=False, stream=FakeTTY()).enabled is False


def test_progress_bar_starts_at_a_resumed_step_and_logs_above_itself(monkeypatch):
    import logging
    import sys

    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    bar = ProgressBar(10, initial=6)
    console = logging.StreamHandler(sys.stderr)  # what the CLI's logging.basicConfig installs (on stdout)
    logging.root.addHandler(console)
    try:
        with bar.redirect_logging():
            logging.getLogger("torchspec.trainer").warning("step 7 | loss 0.500")
        assert console in logging.root.handlers  # restored afterwards
    finally:
        logging.root.removeHandler(console)
    bar.close()
    before, after = tty.getvalue().split("step 7 | loss 0.500\n")
    assert " 6/10 " in before and before.endswith("\r")  # the bar was erased before the line
    assert " 6/10 " in after  # and drawn again below it


def test_the_loop_clock_splits_the_wall_time_into_its_parts(monkeypatch):
    import torchspec.trainer.loop.metrics as metrics

    now = [100.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: now[0])
    clock = metrics.LoopClock()
    with clock.measure("data"):
        now[0] += 1.0
    clock.add("target", 2.0)
    clock.add("draft", 5.0)
    now[0] += 7.0 + 2.0  # target and draft happened in this time, then 2 s of something else
    assert clock.summary() == (
        "data 1.0 s (10%), target 2.0 s (20%), draft 5.0 s (50%), eval 0.0 s (0%), acceptance 0.0 s (0%), "
        "checkpoint 0.0 s (0%), other 2.0 s (20%)"
    )
