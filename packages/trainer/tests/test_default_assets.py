"""The built-in targets' cache: built once under a lock, published whole."""

from torchspec.trainer.commands.default_assets import TinyTargetRecipe, cached_target_folder, ensure_default_target

from trainer_test_helpers import SMALL_TARGET


def test_a_build_killed_before_it_finished_leaves_no_staging_folder_behind(tmp_path):
    recipe = TinyTargetRecipe(**{**SMALL_TARGET, "train_steps": 2})
    final = cached_target_folder(tmp_path, recipe)
    # What a build killed by a signal leaves (no Python cleanup runs then), and another target's
    # staging folder, which this build must not touch.
    stale = tmp_path / f".{final.name}.tmp-killed"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half written")
    unrelated = tmp_path / ".tiny-other-0123456789.tmp-building"
    unrelated.mkdir()

    assert ensure_default_target(tmp_path, recipe) == final
    assert (final / "config.json").is_file()
    assert not stale.exists()
    assert unrelated.is_dir()
