"""Targets whose hidden states come from elsewhere (an engine, a dump), without vLLM.

* ``TargetHead`` reads the final norm, lm_head and embeddings from the folder alone: equal to the
  full model's (untied, tied, sharded checkpoints).
* ``states_to_output`` lays engine states out as the in-process target does.
* A dump written in the documented layout (one tensor per sample, named by its key, ``[T, 4, H]``)
  trains exactly like the in-process target, and every mismatch is refused in one line.
* ``PrefetchingLoader`` asks for batches ahead and still saves the position training is at.
* Configuration mistakes of the engine backend stop before any engine starts.

The engine itself (vLLM) is exercised in integration_tests/test_engine_target.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from torchspec.trainer.config import ConfigError, load_config
from torchspec.trainer.engine.launch import EngineError
from torchspec.trainer.loop.data_loader import DistributedBatchLoader
from torchspec.trainer.loop.prefetch import PrefetchingLoader
from torchspec.trainer.loop.run import train
from torchspec.trainer.targets.contract import states_to_output, unpadded_rows
from torchspec.trainer.targets.dump import DUMP_FORMAT, check_same_dump, sample_key, target_identity
from torchspec.trainer.targets.head import TargetHead
from torchspec.trainer.targets.in_process import TargetModel

from trainer_test_helpers import save_tiny_qwen3, small_overrides, token_dataset


@pytest.mark.parametrize("kind", ["untied", "tied", "sharded"])
def test_the_head_read_alone_equals_the_full_models(tmp_path, kind):
    if kind == "sharded":
        from trainer_test_helpers import tiny_qwen3

        path = tmp_path / "target"
        tiny_qwen3().save_pretrained(path, max_shard_size="200KB")
        assert (path / "model.safetensors.index.json").is_file()
    else:
        path = save_tiny_qwen3(tmp_path / "target", tie=kind == "tied")
    head, full = TargetHead.from_pretrained(path), TargetModel.from_pretrained(path)
    assert torch.equal(head.lm_head_weight, full.lm_head_weight)
    assert torch.equal(head.embed_tokens_weight, full.embed_tokens_weight)
    assert head.num_layers == full.num_layers and head.vocab_size == full.vocab_size
    x = torch.randn(3, 5, full.hidden_size)
    assert torch.equal(head.final_norm(x), full.decoder.norm(x))
    assert not any(p.is_meta for p in head.final_norm.parameters())


def test_a_target_without_safetensors_is_refused_naming_the_fix(tmp_path):
    path = save_tiny_qwen3(tmp_path / "target")
    (path / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="no model.safetensors .* save_pretrained"):
        TargetHead.from_pretrained(path)


def _engine_states(target: TargetModel, ids: list[int]) -> torch.Tensor:
    """What the engine hands out for one sample, ``[T, 4, H]``, computed by transformers: the aux
    layers' inputs, then the last decoder layer's output (caught by a hook, before the final norm)."""
    captured = {}
    hook = target.layers[-1].register_forward_hook(lambda module, args, out: captured.update(last=out))
    out = target(torch.tensor([ids]))
    hook.remove()
    last = captured["last"][0] if isinstance(captured["last"], tuple) else captured["last"]
    aux = out.aux_hidden_states[0].view(len(ids), 3, -1)
    return torch.cat([aux, last[0].unsqueeze(1)], dim=1)


def test_engine_states_become_the_in_process_output(tmp_path):
    """Per-sample ``[T_i, 4, H]`` states (aux layers' inputs, then the last layer's output before
    the norm) give the in-process target's aux and final states on every real position."""
    path = save_tiny_qwen3(tmp_path / "target")
    target = TargetModel.from_pretrained(path)
    lengths = [9, 5, 7]
    samples = [row["input_ids"] for row in token_dataset(lengths)]
    states = [_engine_states(target, ids) for ids in samples]
    width = max(lengths)
    built = states_to_output(states, width, TargetHead.from_pretrained(path).final_norm)
    assert built.aux_hidden_states.shape == (3, width, 3 * target.hidden_size)
    for row, ids in enumerate(samples):
        alone = target(torch.tensor([ids]))
        n = len(ids)
        torch.testing.assert_close(built.aux_hidden_states[row, :n], alone.aux_hidden_states[0])
        torch.testing.assert_close(built.final_hidden[row, :n], alone.final_hidden[0])
        assert not built.aux_hidden_states[row, n:].any()  # padding: zeros, read by nothing


# --- training from a dump ------------------------------------------------------------------------


def _write_dump(directory, config, *, complete=True, drop_one=False):
    """A dump in the documented layout, its states computed by transformers."""
    from transformers import AutoTokenizer

    from torchspec.trainer.loop.training_data import load_training_data

    target_path = config.model.target_model_path
    target = TargetModel.from_pretrained(target_path)
    data = load_training_data(config.data, AutoTokenizer.from_pretrained(target_path), config.training.seed, True)
    tensors = {}
    for split in (data.train, data.eval):
        for ids in split["input_ids"]:
            ids = list(ids)[: config.data.max_seq_length]
            tensors[sample_key(ids)] = _engine_states(target, ids).contiguous()
    if drop_one:
        tensors.pop(next(iter(tensors)))
    (directory / "shards").mkdir(parents=True)
    save_file(tensors, str(directory / "shards" / "shard-00000.safetensors"))
    manifest = {
        "format": DUMP_FORMAT,
        "target": {"path": str(target_path), **target_identity(Path(target_path))},
        "aux_layer_ids": target.aux_layer_ids,
        "vllm_layer_ids": [*target.aux_layer_ids, target.num_layers],
        "dtype": "float32",
        "data": {
            "fingerprint": "",
            "num_samples": len(tensors),
            "train_path": config.data.train_path,
            "chat_template": config.data.chat_template,
            "max_seq_length": config.data.max_seq_length,
        },
        "shard_size": len(tensors),
        "num_shards": 1,
        "complete": complete,
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def test_training_from_a_dump_equals_the_in_process_target(assets, tmp_path):
    reference = train(load_config(None, small_overrides(assets, tmp_path / "in-process")))
    dump = _write_dump(tmp_path / "dump", load_config(None, small_overrides(assets, tmp_path / "unused")))
    from_dump = train(
        load_config(
            None, small_overrides(assets, tmp_path / "from-dump") + ["target.backend=dump", f"target.dump_dir={dump}"]
        )
    )
    losses = [r["loss"] for r in from_dump.train_history]
    expected = [r["loss"] for r in reference.train_history]
    assert len(losses) == len(expected) == 8
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-6, atol=0)
    assert from_dump.eval_metrics["loss"] == pytest.approx(reference.eval_metrics["loss"], rel=1e-6)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("unfinished", "unfinished dump .* run the same `hatch run trainer:dump-states` command again"),
        ("other-target", "was dumped from another target"),
        ("other-layers", r"holds aux layers \[.*\], this run asks for model.aux_layer_ids \[1, 3, 6\]"),
        # A hand-edited manifest must not advise an order the engines would not serve.
        ("layers-out-of-order", r"manifest.json aux_layer_ids must be strictly ascending, got \[4, 3, 2\]"),
        ("missing-sample", "lacks the states of 1 of this run's .* samples: it was dumped from other data"),
        ("no-dump", r"holds no dump \(no manifest.json\); write one with `hatch run trainer:dump-states`"),
    ],
)
def test_a_dump_that_does_not_match_the_run_is_refused(assets, tmp_path, change, message):
    config = load_config(None, small_overrides(assets, tmp_path / "unused"))
    dump = tmp_path / "dump"
    if change == "no-dump":
        dump.mkdir()
    else:
        _write_dump(dump, config, complete=change != "unfinished", drop_one=change == "missing-sample")
    if change == "other-target":
        manifest = json.loads((dump / "manifest.json").read_text())
        manifest["target"]["config_sha256"] = "0" * 64
        (dump / "manifest.json").write_text(json.dumps(manifest))
    if change == "layers-out-of-order":
        manifest = json.loads((dump / "manifest.json").read_text())
        manifest["aux_layer_ids"] = manifest["aux_layer_ids"][::-1]
        (dump / "manifest.json").write_text(json.dumps(manifest))
    extra = ["model.aux_layer_ids=[1,3,6]"] if change == "other-layers" else []
    overrides = small_overrides(assets, tmp_path / "run") + ["target.backend=dump", f"target.dump_dir={dump}", *extra]
    with pytest.raises(ConfigError, match=message):
        train(load_config(None, overrides))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_dump_of_another_fine_tune_of_the_same_architecture_is_refused(tmp_path):
    """Two targets with the same config.json and the same weight file names and sizes, different
    weights (two fine-tunes of one base): the dump of one is refused for the other, in one line
    naming what differs; it is accepted for its own target."""
    from torchspec.trainer.targets.dump import DumpTarget

    a, b = save_tiny_qwen3(tmp_path / "a", seed=0), save_tiny_qwen3(tmp_path / "b", seed=1)
    assert (a / "config.json").read_bytes() == (b / "config.json").read_bytes()
    assert (a / "model.safetensors").stat().st_size == (b / "model.safetensors").stat().st_size
    dump = tmp_path / "dump"
    (dump / "shards").mkdir(parents=True)
    manifest = {
        "format": DUMP_FORMAT,
        "target": {"path": str(a), **target_identity(a)},
        "aux_layer_ids": TargetHead.from_pretrained(a).validate_aux_layer_ids(None),
        "complete": True,
    }
    (dump / "manifest.json").write_text(json.dumps(manifest))
    DumpTarget.open(dump, a, None, torch.float32, "cpu").close()
    with pytest.raises(ConfigError) as raised:
        DumpTarget.open(dump, b, None, torch.float32, "cpu")
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(
        f"target.dump_dir {dump} was dumped from another target ({a}) than model.target_model_path {b}"
    )
    assert "the weights in model.safetensors differ" in message

    # A rerun of dump-states into that folder with the other target is refused alike.
    with pytest.raises(
        ConfigError, match=r"holds a dump of another target .*: the weights in model.safetensors differ"
    ):
        check_same_dump(manifest, {**manifest, "target": {"path": str(b), **target_identity(b)}}, dump)
    # A dump written before the fingerprint existed cannot be told apart from another fine-tune.
    del manifest["target"]["weights_sha256"]
    (dump / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        ConfigError, match="records no fingerprint of the weights .*; train with that target or dump again"
    ):
        DumpTarget.open(dump, a, None, torch.float32, "cpu")


# --- prefetching ---------------------------------------------------------------------------------


class _RecordingTarget:
    """Records what the loader asks the engine for, and what it discards."""

    BYTES_PER_TOKEN = 100

    def __init__(self):
        self.asked, self.discarded = [], 0

    def prefetch(self, input_ids, attention_mask):
        self.asked.append(unpadded_rows(input_ids, attention_mask))

    def state_bytes(self, input_ids, attention_mask):
        return int(attention_mask.sum()) * self.BYTES_PER_TOKEN

    def discard_pending(self):
        self.discarded += 1


def _rows(batch):
    return unpadded_rows(batch.input_ids, batch.attention_mask)


def _loader():
    return DistributedBatchLoader(token_dataset([5, 6, 7, 8, 9, 10, 11, 12] * 2), 4, 2, pad_token_id=0, seed=3)


def test_prefetching_asks_ahead_and_saves_the_position_of_the_batch_returned():
    plain, engine = _loader(), _RecordingTarget()
    ahead = PrefetchingLoader(_loader(), engine, depth=2)
    first = ahead.next_batches()
    # The batch returned and the two after it were asked for (2 micro-batches each).
    assert len(engine.asked) == 6
    assert [_rows(b) for b in first] == [_rows(b) for b in plain.next_batches()]
    assert ahead.state_dict() == plain.state_dict()  # not the underlying loader's, 2 batches further
    for _ in range(3):
        assert [_rows(b) for b in ahead.next_batches()] == [_rows(b) for b in plain.next_batches()]
        assert ahead.state_dict() == plain.state_dict()
    assert ahead.epoch == plain.epoch == 1  # 4 steps per epoch


@pytest.mark.parametrize("max_bytes", [1, 2000, 3000, 10**9])
def test_the_states_asked_ahead_stay_within_the_byte_bound(max_bytes):
    """Whatever the bound, the data order is the plain loader's; the batch about to be trained is
    always asked for, and the ones after it only while the states not yet trained on fit the bound."""
    plain, engine = _loader(), _RecordingTarget()
    ahead = PrefetchingLoader(_loader(), engine, depth=3, max_bytes=max_bytes)
    trained = 0  # micro-batches handed out for training, whose states the step collects
    for _ in range(8):
        batches = ahead.next_batches()
        assert [_rows(b) for b in batches] == [_rows(b) for b in plain.next_batches()]
        outstanding = engine.asked[trained:]
        batch_bytes = sum(len(r) for b in batches for r in _rows(b)) * _RecordingTarget.BYTES_PER_TOKEN
        asked_bytes = sum(len(r) for rows in outstanding for r in rows) * _RecordingTarget.BYTES_PER_TOKEN
        assert len(outstanding) >= len(batches)  # the batch returned was asked for
        assert asked_bytes <= max(max_bytes, batch_bytes), (asked_bytes, max_bytes)
        if max_bytes == 10**9:
            assert len(outstanding) == 2 * 4  # depth 3: this batch and three more, two micro-batches each
        if max_bytes == 1:
            assert len(outstanding) == 2  # only the batch returned
        trained += len(batches)


def test_prefetching_resumes_the_saved_position_and_drops_what_was_asked_ahead():
    ahead = PrefetchingLoader(_loader(), _RecordingTarget(), depth=1)
    ahead.next_batches()
    saved = ahead.state_dict()
    expected = [_rows(b) for b in ahead.next_batches()]
    resumed_engine = _RecordingTarget()
    resumed = PrefetchingLoader(_loader(), resumed_engine, depth=1)
    resumed.next_batches()  # somewhere else, with requests in flight
    resumed.load_state_dict(saved)
    assert resumed_engine.discarded == 1
    assert [_rows(b) for b in resumed.next_batches()] == expected


# --- configuration mistakes, before any engine starts ---------------------------------------------


def test_engine_backend_mistakes_stop_before_an_engine_starts(assets, tmp_path, monkeypatch):
    import torchspec.trainer.engine.launch as engine_target

    def no_engine(*args, **kwargs):
        raise AssertionError("an engine was started")

    monkeypatch.setattr(engine_target.EngineWorker, "__init__", no_engine)
    base = small_overrides(assets, tmp_path / "run") + ["target.backend=vllm"]
    with pytest.raises(ConfigError, match=r"model.aux_layer_ids .* 99"):
        train(load_config(None, [*base, "model.aux_layer_ids=[2,4,99]"]))
    with pytest.raises(ConfigError, match="target.engine_python /nowhere/python does not exist"):
        engine_target.engine_python("/nowhere/python")
    with pytest.raises(ConfigError, match="training.shard_target applies to target.backend=transformers"):
        train(load_config(None, [*base, "training.shard_target=true"]))
    with pytest.raises(ConfigError, match="target.dump_dir is not set"):
        load_config(None, ["target.backend=dump"])


def test_without_vllm_the_engine_backend_says_how_to_install_it(assets, tmp_path, monkeypatch):
    import torchspec.trainer.engine.launch as engine_target

    monkeypatch.setattr(engine_target, "vllm_available", lambda: False)
    monkeypatch.delenv("TORCHSPEC_ENGINE_PYTHON", raising=False)
    with pytest.raises(EngineError, match="needs vLLM, which is not installed here; install the engine environment"):
        train(load_config(None, small_overrides(assets, tmp_path / "run") + ["target.backend=vllm"]))


def test_the_commands_report_backend_mistakes_in_one_line(assets, tmp_path, capsys):
    from torchspec.trainer.cli import main

    from trainer_test_helpers import assert_one_line_error

    code = main(["dump-states", f"model.target_model_path={assets['target']}"])
    assert_one_line_error(code, capsys.readouterr().err, "target.dump_dir is not set")
    unfinished = tmp_path / "dump"
    _write_dump(unfinished, load_config(None, small_overrides(assets, tmp_path / "unused")), complete=False)
    code = main(
        ["train", *small_overrides(assets, tmp_path / "run"), "target.backend=dump", f"target.dump_dir={unfinished}"]
    )
    assert_one_line_error(code, capsys.readouterr().err, "unfinished dump", "dump-states")
    not_a_dump = tmp_path / "busy"
    (not_a_dump / "something").mkdir(parents=True)
    code = main(["dump-states", *small_overrides(assets, tmp_path / "run"), f"target.dump_dir={not_a_dump}"])
    assert_one_line_error(code, capsys.readouterr().err, "exists and is not a dump")


def test_an_engine_is_never_asked_for_layers_out_of_order():
    """vLLM hands the states out in layer order whatever order it was asked in (and once per layer)."""
    from torchspec.trainer.engine.launch import EngineWorker
    from torchspec.trainer.targets.engine import vllm_layer_ids

    with pytest.raises(ConfigError, match=r"layer_ids \[4, 2, 5, 8\] must be distinct and ascending"):
        EngineWorker("no-target-needed", layer_ids=[4, 2, 5, 8])
    with pytest.raises(ConfigError, match=r"layer_ids \[2, 4, 4, 8\] must be distinct and ascending"):
        EngineWorker("no-target-needed", layer_ids=[2, 4, 4, 8])
    assert vllm_layer_ids([2, 4, 5], 8) == [2, 4, 5, 8]
    with pytest.raises(ConfigError, match=r"must be strictly ascending, got \[5, 4, 2\]"):
        vllm_layer_ids([5, 4, 2], 8)


# --- float16 states of DeepSeek-type targets ------------------------------------------------------


def _deepseek_v3_config(**overrides):
    from transformers import DeepseekV3Config

    values = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=4,
        first_k_dense_replace=1,
        moe_intermediate_size=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        tie_word_embeddings=False,
        rope_scaling=None,
    )
    return DeepseekV3Config(**{**values, **overrides})


def _kimi_k25_config():
    from transformers import PretrainedConfig

    return PretrainedConfig(
        architectures=["KimiK25ForConditionalGeneration"], text_config=_deepseek_v3_config(routed_scaling_factor=2.827)
    )


@pytest.mark.parametrize(
    "make_config, dtype, refused",
    [
        (_deepseek_v3_config, torch.float16, "routed_scaling_factor 2.5"),  # DeepSeek-V3's default factor
        (lambda: _deepseek_v3_config(routed_scaling_factor=2.827), torch.float16, "routed_scaling_factor 2.827"),
        (_kimi_k25_config, torch.float16, "routed_scaling_factor 2.827"),  # the factor of its text model
        (_deepseek_v3_config, torch.bfloat16, None),
        (_deepseek_v3_config, torch.float32, None),
        (lambda: _deepseek_v3_config(routed_scaling_factor=1.0), torch.float16, None),  # divided by 1
        (lambda: __import__("trainer_test_helpers").tiny_qwen3().config, torch.float16, None),
    ],
    ids=["v3-fp16", "kimi-k2-fp16", "kimi-k25-fp16", "v3-bf16", "v3-fp32", "factor-1-fp16", "qwen3-fp16"],
)
def test_float16_states_of_a_deepseek_type_target_from_vllm_are_refused(make_config, dtype, refused):
    """vLLM's DeepSeek decoder (deepseek_v2.py, "Fix FP16 overflow") divides the residual stream by
    routed_scaling_factor in float16: its aux states are that factor smaller than transformers' and
    than a bfloat16 deployment's, so a draft trained on them would be served other inputs."""
    from torchspec.trainer.engine.launch import check_engine_dtype

    if refused is None:
        check_engine_dtype(make_config(), dtype)
        return
    with pytest.raises(ConfigError) as err:
        check_engine_dtype(make_config(), dtype)
    message = str(err.value)
    assert "\n" not in message
    for words in (refused, "float16", "target.backend=vllm", "dump-states", "use model.dtype=bfloat16"):
        assert words in message, message


def test_engine_target_and_dump_states_refuse_float16_before_an_engine_starts(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    import torchspec.trainer.engine.launch as engine_target
    from torchspec.trainer.commands.dump_states import dump_states
    from torchspec.trainer.targets.engine import EngineTarget

    def no_engine(*args, **kwargs):
        raise AssertionError("an engine was started")

    monkeypatch.setattr(engine_target.EngineWorker, "__init__", no_engine)
    torch.manual_seed(0)
    target = tmp_path / "deepseek"
    AutoModelForCausalLM.from_config(_deepseek_v3_config()).save_pretrained(target)
    with pytest.raises(ConfigError, match="use model.dtype=bfloat16"):
        EngineTarget.start(target, None, torch.float16, "cpu", max_seq_length=32)
    config = load_config(
        None, [f"model.target_model_path={target}", "model.dtype=float16", f"target.dump_dir={tmp_path / 'dump'}"]
    )
    with pytest.raises(ConfigError, match="use model.dtype=bfloat16"):
        dump_states(config)
    assert not (tmp_path / "dump").exists()
