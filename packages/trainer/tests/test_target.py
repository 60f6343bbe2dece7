import pytest
import torch

from torchspec.trainer.config import ConfigError
from torchspec.trainer.targets.in_process import TargetModel

from trainer_test_helpers import VOCAB, save_tiny_qwen3, tiny_qwen3


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    return save_tiny_qwen3(tmp_path_factory.mktemp("target"), num_layers=8)


@pytest.fixture(scope="module")
def reference(target_dir):
    """The same weights, used the plain Hugging Face way."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()


def batch(seed=0, pad=3):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (2, 11), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -pad:] = 0
    return input_ids, attention_mask


def test_default_ids_are_the_inputs_of_layers_2_mid_and_L_minus_3(target_dir, reference):
    target = TargetModel.from_pretrained(target_dir)
    assert target.num_layers == 8 and target.aux_layer_ids == [2, 4, 5] == target.default_aux_layer_ids()
    input_ids, attention_mask = batch()
    out = target(input_ids, attention_mask)
    with torch.no_grad():
        hf = reference(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    # hidden_states[i] is the residual stream entering layer i (hidden_states[0]: the embeddings).
    expected = torch.cat([hf.hidden_states[2], hf.hidden_states[4], hf.hidden_states[5]], dim=-1)
    assert out.aux_hidden_states.shape == (2, 11, 3 * 64)
    torch.testing.assert_close(out.aux_hidden_states, expected, rtol=0, atol=0)
    # The final hidden state is what lm_head consumes: it reproduces the target's logits.
    assert out.final_hidden.shape == (2, 11, 64)
    torch.testing.assert_close(out.final_hidden @ target.lm_head_weight.T, hf.logits, rtol=1e-5, atol=1e-5)


def test_custom_ids_are_concatenated_low_mid_high(target_dir, reference):
    target = TargetModel.from_pretrained(target_dir, aux_layer_ids=[0, 3, 7])
    input_ids, attention_mask = batch(seed=1)
    out = target(input_ids, attention_mask)
    with torch.no_grad():
        hf = reference(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    low, mid, high = out.aux_hidden_states.split(64, dim=-1)
    torch.testing.assert_close(low, hf.hidden_states[0], rtol=0, atol=0)
    torch.testing.assert_close(mid, hf.hidden_states[3], rtol=0, atol=0)
    torch.testing.assert_close(high, hf.hidden_states[7], rtol=0, atol=0)


def test_ids_out_of_order_are_config_errors(target_dir):
    # The engines concatenate in layer order: [7, 0, 3] would train fc on inputs served permuted.
    with pytest.raises(ConfigError, match=r"must be strictly ascending, got \[7, 0, 3\].*order: \[0, 3, 7\]"):
        TargetModel.from_pretrained(target_dir, aux_layer_ids=[7, 0, 3])


def test_capture_keeps_nothing_between_calls_and_needs_no_grad(target_dir):
    target = TargetModel.from_pretrained(target_dir)
    out = target(*batch())
    assert target._captured == {}
    assert not out.aux_hidden_states.requires_grad and not out.final_hidden.requires_grad
    assert all(not p.requires_grad for p in target.model.parameters())
    assert not target.model.training
    # Outputs can enter an autograd graph (no_grad tensors, not inference-mode tensors).
    weight = torch.nn.Parameter(torch.ones(3 * 64))
    (out.aux_hidden_states * weight).sum().backward()
    assert weight.grad is not None


def test_weights_the_draft_needs(target_dir, reference):
    target = TargetModel.from_pretrained(target_dir)
    assert torch.equal(target.embed_tokens_weight, reference.get_input_embeddings().weight)
    assert torch.equal(target.lm_head_weight, reference.lm_head.weight)
    assert target.hidden_size == 64 and target.vocab_size == VOCAB


def test_wrapping_an_in_memory_model_matches_loading(target_dir):
    model = tiny_qwen3(num_layers=8)
    wrapped = TargetModel(model)
    loaded = TargetModel.from_pretrained(target_dir)
    input_ids, attention_mask = batch(seed=2)
    torch.testing.assert_close(
        wrapped(input_ids, attention_mask).final_hidden, loaded(input_ids, attention_mask).final_hidden
    )


@pytest.mark.parametrize("ids", [[2, 4, 8], [-1, 2, 3]])
def test_ids_outside_the_depth_are_config_errors(target_dir, ids):
    with pytest.raises(ConfigError, match=r"outside the target's 8 layers; use ids in \[0, 7\]"):
        TargetModel.from_pretrained(target_dir, aux_layer_ids=ids)
    with pytest.raises(ConfigError, match="must list 3 layers"):
        TargetModel.from_pretrained(target_dir, aux_layer_ids=[1, 2])


def test_a_folder_without_config_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"model.target_model_path .* \(no config.json there\)"):
        TargetModel.from_pretrained(tmp_path)
