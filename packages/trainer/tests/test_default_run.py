"""The embedded default: `hatch run trainer:train` with no config needs nothing but this repository."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from torchspec.trainer.config import TrainConfig, load_config
from torchspec.trainer.distributed.host_memory import find_tcmalloc

REPO = Path(__file__).resolve().parents[3]


def test_default_llama_yaml_spells_out_the_embedded_default():
    assert load_config(REPO / "configs" / "default_llama.yaml") == TrainConfig()


def test_default_mla_yaml_differs_only_in_the_draft_its_deepseek_target_and_output():
    mla = load_config(REPO / "configs" / "default_mla.yaml")
    expected = TrainConfig()
    expected.model.draft_architecture = "mla"
    expected.model.target_model_path = "builtin:tiny-deepseek-v3"
    expected.training.output_dir = "outputs/default_mla"
    assert mla == expected


@pytest.mark.slow
def test_no_argument_run_trains_and_points_to_the_export(tmp_path):
    """The default run, shortened to 20 steps; the tiny target comes from (or goes to) the user cache."""
    result = subprocess.run(
        [sys.executable, "-m", "torchspec.trainer.cli", "train", "training.max_steps=20", "metrics.eval_interval=10"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # A CPU run starts itself again on tcmalloc where there is one (host_memory), logging nothing twice.
    assert f"(host allocator: {'tcmalloc' if find_tcmalloc() else 'system'})" in result.stdout
    assert result.stdout.count("data: read") == 1
    output_dir = Path("outputs/default_llama")
    assert f"checkpoint: {output_dir / 'iter_0000020'}" in result.stdout
    assert f"next: hatch run converter:export  (exports this run to {output_dir}_hf)" in result.stdout
    assert (tmp_path / "outputs" / ".last_run").read_text().strip() == str(tmp_path / output_dir)
    records = [json.loads(line) for line in (tmp_path / output_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert train[-1]["loss"] < 0.8 * train[0]["loss"] and train[-1]["acc"] > train[0]["acc"] + 0.2
    from torchspec.draft_models import TrainingCheckpoint

    # the checkpoint export reads (integration_tests/test_first_hour.py runs the export itself)
    checkpoint = TrainingCheckpoint.open(tmp_path / output_dir)
    assert checkpoint.path.name == "iter_0000020" and "fc.weight" in checkpoint.weight_names()
