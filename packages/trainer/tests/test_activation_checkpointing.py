"""Activation checkpointing, applied to the draft from outside (``parallelize.apply_activation_checkpointing``):
bitwise the same loss and gradients in every mode, the named modules really recomputed in backward,
unchanged parameter and state-dict names."""

import copy

import pytest
import torch

from torchspec.draft_models import Eagle3Model
from torchspec.trainer.config import ModelConfig
from torchspec.trainer.distributed.parallelize import (
    ACTIVATION_CHECKPOINTING,
    apply_activation_checkpointing,
    checkpointed_modules,
)
from torchspec.trainer.loop.draft import build_draft, resolve_draft_config
from torchspec.trainer.targets.in_process import TargetModel

from trainer_test_helpers import VOCAB, tiny_qwen3

LENGTH = 3


@pytest.fixture(scope="module")
def target():
    torch.manual_seed(0)
    return TargetModel(tiny_qwen3(num_layers=6))


@pytest.fixture(scope="module", params=["llama", "mla"])
def draft(request, target):
    torch.manual_seed(0)
    return build_draft(resolve_draft_config(ModelConfig(draft_architecture=request.param), target.config), target)


def _grads(model: Eagle3Model) -> dict[str, torch.Tensor]:
    names = list(model.state_dict(keep_vars=True))
    params = dict(zip(names, model.state_dict(keep_vars=True).values()))
    return {name: p.grad for name, p in params.items() if isinstance(p, torch.nn.Parameter) and p.grad is not None}


def _counting(forward, name: str, calls: list[str]):
    def counted(*args, **kwargs):
        calls.append(name)
        return forward(*args, **kwargs)

    return counted


def _run(draft, target, mode: str):
    model = Eagle3Model(copy.deepcopy(draft), LENGTH)
    forwards = []  # every run of the decoder layer's attention and MLP (the recomputation calls
    for name in ("self_attn", "mlp"):  # forward without the module hooks, so forward is counted)
        module = model.draft.midlayer.get_submodule(name)
        module.forward = _counting(module.forward, name, forwards)
    apply_activation_checkpointing(model, mode)
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 10))
    out = target(ids)
    loss = model(
        ids,
        out.aux_hidden_states,
        torch.ones_like(ids),
        target_hidden=out.final_hidden,
        target_head_weight=target.lm_head_weight,
    ).total_loss(0.8)
    during_forward = list(forwards)
    loss.backward()
    recomputed = forwards[len(during_forward) :]
    return model, loss.detach(), _grads(model), recomputed


def test_every_mode_gives_the_same_loss_and_gradients(draft, target):
    _, loss, grads, recomputed = _run(draft, target, "none")
    assert recomputed == []
    assert len(grads) > 5
    for mode in ("mlp", "layer"):
        _, mode_loss, mode_grads, _ = _run(draft, target, mode)
        assert torch.equal(mode_loss, loss), mode
        assert mode_grads.keys() == grads.keys(), mode
        for name in grads:
            assert torch.equal(mode_grads[name], grads[name]), f"{mode}: {name}"


def test_the_named_modules_are_recomputed_in_backward(draft, target):
    model, _, _, recomputed = _run(draft, target, "mlp")
    assert checkpointed_modules(model) == ["draft.midlayer.mlp"]
    assert recomputed == ["mlp"] * LENGTH  # each TTT step's MLP again, the attention not
    model, _, _, recomputed = _run(draft, target, "layer")
    assert checkpointed_modules(model) == ["draft.midlayer"]
    assert sorted(recomputed) == sorted(["self_attn", "mlp"] * LENGTH)  # the whole layer of every step


def test_names_and_state_dicts_do_not_change(draft, target):
    plain = Eagle3Model(copy.deepcopy(draft), LENGTH)
    for mode in ACTIVATION_CHECKPOINTING:
        model = apply_activation_checkpointing(Eagle3Model(copy.deepcopy(draft), LENGTH), mode)
        assert list(model.state_dict()) == list(plain.state_dict()), mode
        assert list(model.draft.state_dict()) == list(draft.state_dict()), mode


def test_an_unknown_mode_is_refused(draft):
    with pytest.raises(ValueError, match="choose one of none, mlp, layer"):
        apply_activation_checkpointing(Eagle3Model(copy.deepcopy(draft), LENGTH), "full")
