import itertools
import math

import pytest
import torch

from torchspec.trainer.loop.lr_schedule import WarmupDecaySchedule, build_lr_scheduler, warmup_steps_for


def lrs_through_lambda_lr(schedule: WarmupDecaySchedule, base_lr: float = 0.5) -> list[float]:
    """The learning rate each optimizer step actually used."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=base_lr)
    scheduler = build_lr_scheduler(optimizer, schedule)
    used = []
    for _ in range(schedule.total_steps):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return used


def test_cosine_matches_the_closed_form():
    total, warmup, floor, base = 50, 5, 0.1, 0.5
    used = lrs_through_lambda_lr(WarmupDecaySchedule(total, warmup, "cosine", min_lr_ratio=floor), base)
    for step, lr in enumerate(used):
        if step < warmup:
            expected = base * (step + 1) / warmup
        else:
            angle = math.pi * (step - warmup) / (total - 1 - warmup)
            expected = base * (floor + (1 - floor) * (math.cos(angle) + 1) / 2)
        assert lr == pytest.approx(expected, rel=1e-12)
    # Landmarks, independent of the formula: full rate right after warmup, the floor at the end.
    assert used[warmup - 1] == pytest.approx(base) and used[warmup] == pytest.approx(base)
    assert used[-1] == pytest.approx(base * floor)
    assert all(a >= b for a, b in zip(used[warmup:], used[warmup + 1 :]))


def test_constant_after_warmup():
    used = lrs_through_lambda_lr(WarmupDecaySchedule(20, 4, "constant"), 1.0)
    assert used[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert used[4:] == [1.0] * 16


def test_wsd_is_stable_then_linear_to_the_floor():
    total, warmup, decay_ratio, floor = 40, 4, 0.25, 0.2
    used = lrs_through_lambda_lr(
        WarmupDecaySchedule(total, warmup, "wsd", min_lr_ratio=floor, decay_ratio=decay_ratio), 1.0
    )
    decay_steps = 10
    assert used[warmup : total - decay_steps] == [1.0] * (total - decay_steps - warmup)
    decay = used[total - decay_steps :]
    assert decay[0] == pytest.approx(1.0) and decay[-1] == pytest.approx(floor)
    steps = [b - a for a, b in itertools.pairwise(decay)]
    assert steps == pytest.approx([(floor - 1.0) / (decay_steps - 1)] * (decay_steps - 1))


def test_no_warmup_starts_at_full_rate():
    assert WarmupDecaySchedule(10, 0, "cosine")(0) == pytest.approx(1.0)


def test_warmup_from_ratio_or_steps():
    assert warmup_steps_for(200, None, 0.05) == 10
    assert warmup_steps_for(200, 7, None) == 7
    assert warmup_steps_for(200, None, None) == 0


def test_state_dict_resumes_the_same_sequence():
    schedule = WarmupDecaySchedule(30, 3, "cosine", min_lr_ratio=0.1)
    uninterrupted = lrs_through_lambda_lr(schedule)

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.5)
    scheduler = build_lr_scheduler(optimizer, WarmupDecaySchedule(30, 3, "cosine", min_lr_ratio=0.1))
    for _ in range(12):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    assert state["lr_lambdas"][0]["total_steps"] == 30  # the schedule's parameters are recorded

    fresh_param = torch.nn.Parameter(torch.zeros(1))
    fresh_optimizer = torch.optim.SGD([fresh_param], lr=0.5)
    fresh = build_lr_scheduler(fresh_optimizer, WarmupDecaySchedule(30, 3, "cosine", min_lr_ratio=0.1))
    fresh.load_state_dict(state)
    fresh_optimizer.param_groups[0]["lr"] = fresh.get_last_lr()[0]
    resumed = []
    for _ in range(18):
        resumed.append(fresh_optimizer.param_groups[0]["lr"])
        fresh_optimizer.step()
        fresh.step()
    assert resumed == pytest.approx(uninterrupted[12:], rel=1e-12)


def test_bad_arguments():
    with pytest.raises(ValueError, match="lr_schedule='linear'"):
        WarmupDecaySchedule(10, 0, "linear")
    with pytest.raises(ValueError, match="total_steps"):
        WarmupDecaySchedule(0)
