import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from torchspec.draft_models import Eagle3Model
from torchspec.trainer.config import ModelConfig
from torchspec.trainer.distributed.parallelize import (
    apply_activation_checkpointing,
    draft_fsdp_units,
    parallelize_draft,
)
from torchspec.trainer.distributed.process_group import all_reduce_sum, init_distributed, mixed_precision_policy
from torchspec.trainer.loop.draft import build_draft, resolve_draft_config
from torchspec.trainer.targets.in_process import TargetModel

from trainer_test_helpers import VOCAB, tiny_qwen3


@pytest.fixture
def one_process_group():
    assert not dist.is_initialized()
    ctx = init_distributed("cpu")
    yield ctx
    dist.destroy_process_group()


def _assert_same_step(model, reference, target):
    """One forward and backward of the sharded ``model`` and the plain ``reference``: the same loss,
    the same gradients (the sharded ones gathered)."""
    ids = torch.randint(0, VOCAB, (2, 10))
    out = target(ids)
    mask = torch.ones_like(ids)
    kwargs = {"target_hidden": out.final_hidden, "target_head_weight": target.lm_head_weight}
    loss = model(ids, out.aux_hidden_states, mask, **kwargs).total_loss()
    expected = reference(ids, out.aux_hidden_states, mask, **kwargs).total_loss()
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss, expected)
    for (name, param), ref in zip(model.named_parameters(), reference.parameters()):
        if ref.grad is None:
            assert param.grad is None, name
            continue
        torch.testing.assert_close(param.grad.full_tensor(), ref.grad, msg=name)


def test_without_torchrun_a_one_process_group(one_process_group):
    ctx = one_process_group
    assert (ctx.rank, ctx.world_size, ctx.device.type) == (0, 1, "cpu")
    assert dist.get_backend() == "gloo" and ctx.mesh.size() == 1
    assert torch.equal(all_reduce_sum(torch.tensor([1.0, 2.0])), torch.tensor([1.0, 2.0]))


def test_every_linear_but_lm_head_is_its_own_unit_and_numerics_are_unchanged(one_process_group):
    torch.manual_seed(0)
    target = TargetModel(tiny_qwen3(num_layers=6))
    draft = build_draft(resolve_draft_config(ModelConfig(), target.config), target)
    reference = Eagle3Model(copy.deepcopy(draft), length=3)
    model = parallelize_draft(Eagle3Model(draft, length=3), one_process_group.mesh)

    linear_names = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    sharded = {name for name, module in model.named_modules() if isinstance(module, FSDPModule)}
    assert "" in sharded  # the root
    # every projection outside the MLP; the MLP whole (its forward reads its three projections)
    mlp_projections = {name for name in linear_names if name.startswith("draft.midlayer.mlp.")}
    assert len(mlp_projections) == 3
    assert sharded - {""} == (linear_names - {"draft.lm_head"} - mlp_projections) | {"draft.midlayer.mlp"}
    assert "draft.fc" in sharded and "draft.midlayer.self_attn.q_proj" in sharded
    assert sharded - {""} == {name for name, _ in draft_fsdp_units(model)}

    _assert_same_step(model, reference, target)


@pytest.mark.parametrize("mode", ["mlp", "layer"])
def test_activation_checkpointing_under_fsdp_keeps_the_units_and_the_numerics(one_process_group, mode):
    """The trainer's order (torchtitan's): checkpoint wrappers first, then FSDP2 units inside them."""
    torch.manual_seed(0)
    target = TargetModel(tiny_qwen3(num_layers=6))
    draft = build_draft(resolve_draft_config(ModelConfig(), target.config), target)
    reference = Eagle3Model(copy.deepcopy(draft), length=3)
    plain_units = [name for name, _ in draft_fsdp_units(Eagle3Model(copy.deepcopy(draft), length=3))]
    model = apply_activation_checkpointing(Eagle3Model(draft, length=3), mode)
    model = parallelize_draft(model, one_process_group.mesh)
    assert [name for name, _ in draft_fsdp_units(model)] == plain_units
    assert all(isinstance(module, FSDPModule) for _, module in draft_fsdp_units(model))

    _assert_same_step(model, reference, target)


def test_mixed_precision_policy():
    assert mixed_precision_policy(torch.float32) is None
    policy = mixed_precision_policy(torch.bfloat16)
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32


@pytest.mark.parametrize("world_size, finalized", [("1", True), ("2", False)])
def test_a_process_of_a_multi_process_launch_exits_without_finalizing_the_interpreter(world_size, finalized):
    """torchrun's processes end without interpreter finalization (during which a gloo worker thread
    still freeing a tensor aborts the process: exit_process), with their output flushed and their
    exit status kept; a one-process command ends normally (atexit handlers run)."""
    script = (
        "import atexit\n"
        "from torchspec.trainer.distributed.process_group import exit_process\n"
        "atexit.register(lambda: print('finalized'))\n"
        "print('unterminated line', end='')\n"
        "exit_process(3)\n"
    )
    env = {**os.environ, "WORLD_SIZE": world_size}
    completed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 3, completed.stderr
    assert completed.stdout.startswith("unterminated line")
    assert ("finalized" in completed.stdout) == finalized
