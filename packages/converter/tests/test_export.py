import json
import os

import pytest
import torch
from safetensors import safe_open

from torchspec.converter import ConverterError, check_serving_folder, export_checkpoint
from torchspec.converter.cli import main
from torchspec.draft_models import AutoEagle3DraftModel

from converter_helpers import VOCAB, draft_logits, tiny_draft, write_training_checkpoint


def _keys(folder):
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        return set(handle.keys())


@pytest.mark.parametrize("kind", ["llama", "mla"])
@pytest.mark.parametrize("draft_vocab", [VOCAB, 50])
def test_round_trip_gives_the_trained_outputs(tmp_path, kind, draft_vocab):
    draft = tiny_draft(kind, draft_vocab)
    write_training_checkpoint(draft, tmp_path / "run")
    result = export_checkpoint(tmp_path / "run", include_embeddings=True)
    assert result.output == tmp_path / "run_hf"
    # export and check agree; that vLLM serves such folders is held by integration_tests/test_engine.py
    assert check_serving_folder(result.output) == []
    loaded = AutoEagle3DraftModel.from_pretrained(result.output)
    torch.testing.assert_close(draft_logits(loaded), draft_logits(draft))
    config = json.loads((result.output / "config.json").read_text())
    assert config["architectures"] == [draft.config.architectures[0]]
    assert config["num_hidden_layers"] == 1 and config["tie_word_embeddings"] is False
    assert config["vocab_size"] == VOCAB and config["draft_vocab_size"] == draft_vocab
    # The default aux layers are written too, in both engines' layouts: [2, 3, 5] for this 6-layer
    # target, where the engines' own fallback (2, L // 2, L - 3) would repeat layer 3.
    assert config["eagle_aux_hidden_state_layer_ids"] == [2, 3, 5]  # vLLM: input to layer j
    assert config["eagle_config"] == {"use_aux_hidden_state": True, "eagle_aux_hidden_state_layer_ids": [1, 2, 4]}
    assert config["num_aux_hidden_states"] == 3
    assert config["model_type"] == ("llama" if kind == "llama" else "deepseek_v2")
    if kind == "llama":
        assert config["head_dim"] == 12
    else:
        assert config["kv_lora_rank"] == 448 and config["q_lora_rank"] == 16
    keys = _keys(result.output)
    assert ("d2t" in keys) == (draft_vocab < VOCAB)
    assert "lm_head.weight" in keys and not any(k.startswith("model.") for k in keys)


@pytest.mark.parametrize("kind", ["llama", "mla"])
def test_eagle3_1_drafts_export_with_their_norms_and_flags(tmp_path, kind):
    options = {"fc_norm": True, "norm_output": True, "norm_before_fc": kind == "llama"}
    draft = tiny_draft(kind, 50, **options)
    write_training_checkpoint(draft, tmp_path / "run")
    result = export_checkpoint(tmp_path / "run", include_embeddings=True)
    findings = check_serving_folder(result.output)
    assert [f.level for f in findings] == (["warning"] if kind == "llama" else [])
    if kind == "llama":  # SGLang would drop input_norm without a word
        assert "norm_before_fc: only vLLM serves it; SGLang" in findings[0].message
    config = json.loads((result.output / "config.json").read_text())
    assert {key: config[key] for key in options} == options  # top level, where vLLM reads them
    assert {"fc_norm.0.weight", "fc_norm.1.weight", "fc_norm.2.weight"} <= _keys(result.output)
    assert ("input_norm.weight" in _keys(result.output)) == (kind == "llama")
    torch.testing.assert_close(draft_logits(AutoEagle3DraftModel.from_pretrained(result.output)), draft_logits(draft))

    # weights without the flag that uses them: check names the stray key
    config["fc_norm"] = False
    (result.output / "config.json").write_text(json.dumps(config))
    assert any("unexpected key fc_norm.0.weight" in f.message for f in check_serving_folder(result.output))


def test_norm_before_fc_on_an_mla_draft_fails_check(tmp_path, capsys):
    write_training_checkpoint(tiny_draft("mla", norm_before_fc=True), tmp_path / "run")
    with pytest.raises(ConverterError, match="norm_before_fc: true: vLLM's DeepSeek EAGLE-3 draft"):
        export_checkpoint(tmp_path / "run")
    assert not (tmp_path / "run_hf").exists()


def test_embeddings_only_when_asked(tmp_path):
    write_training_checkpoint(tiny_draft("llama"), tmp_path / "run")
    result = export_checkpoint(tmp_path / "run", tmp_path / "out", dtype="bfloat16")
    assert "embed_tokens.weight" not in _keys(result.output)
    assert json.loads((result.output / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(result.output / "model.safetensors"), framework="pt") as handle:
        assert handle.get_tensor("fc.weight").dtype == torch.bfloat16


def test_default_aux_layers_of_a_large_target_are_written_for_both_engines(tmp_path):
    write_training_checkpoint(tiny_draft("llama"), tmp_path / "run", num_target_layers=36)
    config = json.loads((export_checkpoint(tmp_path / "run").output / "config.json").read_text())
    assert config["eagle_aux_hidden_state_layer_ids"] == [2, 18, 33]
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 17, 32]


def test_a_checkpoint_without_aux_layers_json_gets_the_targets_default_ids(tmp_path):
    path = write_training_checkpoint(tiny_draft("llama"), tmp_path / "run")
    (path / "aux_layers.json").unlink()  # a checkpoint copied without it
    target = tmp_path / "target"
    target.mkdir()
    (target / "config.json").write_text(json.dumps({"num_hidden_layers": 8}))
    config = json.loads((export_checkpoint(path, target_model_path=target).output / "config.json").read_text())
    assert config["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5]


def test_custom_aux_layers_are_written_for_both_engines(tmp_path):
    write_training_checkpoint(tiny_draft("llama"), tmp_path / "run", aux_layer_ids=[1, 3, 5], num_target_layers=8)
    config = json.loads((export_checkpoint(tmp_path / "run").output / "config.json").read_text())
    assert config["eagle_aux_hidden_state_layer_ids"] == [1, 3, 5]  # vLLM: input to layer j
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 2, 4]  # SGLang: output of layer j


def test_output_dir_resolves_to_latest_complete_checkpoint(tmp_path):
    old = tiny_draft("llama", seed=1)
    new = tiny_draft("llama", seed=2)
    write_training_checkpoint(old, tmp_path / "run", step=10)
    write_training_checkpoint(new, tmp_path / "run", step=20)
    (tmp_path / "run" / ".tmp_iter_0000030").mkdir()  # a save in progress is never picked
    unfinished = write_training_checkpoint(tiny_draft("llama", seed=3), tmp_path / "other", step=40)
    (unfinished / "COMPLETE").unlink()  # an iter_ folder without the marker is not complete
    (tmp_path / "run" / "iter_0000040").symlink_to(unfinished, target_is_directory=True)
    result = export_checkpoint(tmp_path / "run", include_embeddings=True)
    assert result.checkpoint.name == "iter_0000020"
    torch.testing.assert_close(draft_logits(AutoEagle3DraftModel.from_pretrained(result.output)), draft_logits(new))


def test_existing_output_needs_force_and_a_crash_leaves_it_intact(tmp_path, monkeypatch):
    write_training_checkpoint(tiny_draft("llama"), tmp_path / "run")
    out = export_checkpoint(tmp_path / "run").output
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(ConverterError, match="already exists; pass --force"):
        export_checkpoint(tmp_path / "run")

    import torchspec.converter.export as export_module

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # killed while writing

    monkeypatch.setattr(export_module, "write_safetensors", crash)
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(tmp_path / "run", force=True)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "run_hf"]  # no staging folder left


def test_pruned_head_keeps_the_full_heads_logits(tmp_path):
    full = tiny_draft("mla")
    write_training_checkpoint(full, tmp_path / "run")
    kept = torch.tensor([3, 7, 8, 30, 64, 99, 119])
    result = export_checkpoint(tmp_path / "run", include_embeddings=True, new_draft_target_ids=kept)
    pruned = AutoEagle3DraftModel.from_pretrained(result.output)
    assert torch.equal(pruned.draft_to_target_ids(), kept)
    torch.testing.assert_close(draft_logits(pruned), draft_logits(full)[..., kept])
    assert check_serving_folder(result.output) == []


def test_re_pruning_a_pruned_head_uses_its_mapping(tmp_path):
    trained = tiny_draft("llama", 50)
    write_training_checkpoint(trained, tmp_path / "run")
    old_ids = trained.draft_to_target_ids()
    subset = old_ids[torch.tensor([0, 4, 9, 20, 49])]
    pruned = AutoEagle3DraftModel.from_pretrained(
        export_checkpoint(tmp_path / "run", include_embeddings=True, new_draft_target_ids=subset).output
    )
    torch.testing.assert_close(draft_logits(pruned), draft_logits(trained)[..., torch.tensor([0, 4, 9, 20, 49])])
    outside = torch.tensor(sorted(set(range(VOCAB)) - set(old_ids.tolist()))[:2])
    with pytest.raises(ConverterError, match="never scored"):
        export_checkpoint(tmp_path / "run", tmp_path / "other", new_draft_target_ids=outside)


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["export", "--input", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["export", "--input", str(tmp_path / "empty")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err

    path = write_training_checkpoint(tiny_draft("llama"), tmp_path / "run")
    assert main(["export", "--input", str(path), "--prune-vocab", "--draft-vocab-size", "10"]) == 2
    assert "needs --dataset-path, --tokenizer, --chat-template" in capsys.readouterr().err
    assert main(["export", "--input", str(path), "--prune-vocab", "--draft-vocab-size", "500"]) == 2
    assert "must be in [1, 120]" in capsys.readouterr().err

    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2Eagle"]}))
    assert main(["export", "--input", str(path)]) == 2
    assert "unknown draft architecture 'GPT2Eagle'" in capsys.readouterr().err
    (path / "config.json").write_text(json.dumps({**config, "draft_vocab_size": 60}))
    assert main(["export", "--input", str(path)]) == 2
    assert "holds no d2t mapping" in capsys.readouterr().err
    (path / "config.json").unlink()
    assert main(["export", "--input", str(path)]) == 2
    assert "incomplete" in capsys.readouterr().err


def test_check_command_reports_contract_violations(tmp_path, capsys):
    write_training_checkpoint(tiny_draft("llama", 50), tmp_path / "run")
    out = export_checkpoint(tmp_path / "run").output
    assert main(["check", str(out)]) == 0

    config = json.loads((out / "config.json").read_text())
    bad = {
        **config,
        "tie_word_embeddings": True,
        "eagle_config": {"use_aux_hidden_state": True, "eagle_aux_hidden_state_layer_ids": [0, 2, 4]},
    }
    del bad["head_dim"], bad["eagle_aux_hidden_state_layer_ids"]  # SGLang's ids left alone
    (out / "config.json").write_text(json.dumps(bad))
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(out / "model.safetensors"))
    tensors["d2t"] = (torch.arange(50) + tensors["d2t"]).int()  # ids instead of int64 offsets
    del tensors["lm_head.weight"]
    tensors["model.extra"] = torch.zeros(1)
    save_file(tensors, str(out / "model.safetensors"))
    assert main(["check", str(out)]) == 1
    printed = capsys.readouterr().out
    for expected in (
        "tie_word_embeddings must be false",
        "explicit head_dim",
        "only one engine",
        "lm_head.weight is missing",
        "d2t has dtype torch.int32",
        "'model.' prefix",
    ):
        assert expected in printed, expected


def test_export_removes_what_killed_exports_left_behind(tmp_path):
    import subprocess
    import sys

    draft = tiny_draft("llama")
    write_training_checkpoint(draft, tmp_path / "run")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    abandoned = [tmp_path / f".run_hf.tmp-{dead_pid}-abc123", tmp_path / f".run_hf.old-{dead_pid}"]
    in_progress = tmp_path / f".run_hf.tmp-{os.getpid()}-live01"  # a live process's staging stays
    for folder in (*abandoned, in_progress):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    export_checkpoint(tmp_path / "run")
    assert not any(folder.exists() for folder in abandoned)
    assert in_progress.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [in_progress.name, "run", "run_hf"]


def test_an_export_killed_between_its_renames_loses_neither_folder(tmp_path, monkeypatch):
    """A killed export whose previous folder was set aside, its replacement not yet in place: the
    next export puts the previous folder back first, so even when that export fails, the last good
    export is where it was (before: both copies were deleted as abandoned)."""
    import subprocess
    import sys

    import torchspec.converter.export as export_module

    draft = tiny_draft("llama")
    write_training_checkpoint(draft, tmp_path / "run")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    aside = tmp_path / f".run_hf.old-{int(dead.stdout)}"
    aside.mkdir()
    (aside / "config.json").write_text("the previous export\n")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_module, "write_safetensors", full_disk)
    with pytest.raises(ConverterError, match="No space left"):
        export_checkpoint(tmp_path / "run")
    assert (tmp_path / "run_hf" / "config.json").read_text() == "the previous export\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "run_hf"]


def test_export_without_input_takes_the_best_checkpoint_and_says_so(tmp_path, monkeypatch, capsys):
    from torchspec.draft_models.run_pointer import record_last_run

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "outputs" / "run"
    best, latest = tiny_draft("llama", seed=1), tiny_draft("llama", seed=2)
    write_training_checkpoint(best, run, step=10)
    write_training_checkpoint(latest, run, step=20)
    record = {"checkpoint": "iter_0000010", "step": 10, "metric": "real_acceptance_length", "value": 2.5}
    (run / "best.json").write_text(json.dumps(record))
    record_last_run(run)
    assert main(["export", "--include-embeddings"]) == 0
    out = capsys.readouterr().out
    assert (
        "the best checkpoint of outputs/run: iter_0000010 (best.json: real_acceptance_length 2.500 at step 10)" in out
    )
    exported = tmp_path / "outputs" / "run_hf"
    torch.testing.assert_close(draft_logits(AutoEagle3DraftModel.from_pretrained(exported)), draft_logits(best))

    # Without best.json (or one naming a checkpoint that is gone): the latest, and it says why.
    (run / "best.json").write_text(json.dumps({**record, "checkpoint": "iter_0000005"}))
    assert main(["export", "--include-embeddings", "--force"]) == 0
    out = capsys.readouterr().out
    assert "the latest checkpoint of outputs/run: iter_0000020 (best.json names iter_0000005" in out
    (run / "best.json").unlink()
    assert main(["export", "--include-embeddings", "--force"]) == 0
    assert "the latest checkpoint of outputs/run: iter_0000020 (no best.json)" in capsys.readouterr().out
    torch.testing.assert_close(draft_logits(AutoEagle3DraftModel.from_pretrained(exported)), draft_logits(latest))

    # An explicit --input wins: the run's newest, as before.
    (run / "best.json").write_text(json.dumps(record))
    assert main(["export", "--input", str(run), "--output", str(tmp_path / "explicit")]) == 0
    assert "iter_0000020" in capsys.readouterr().out
