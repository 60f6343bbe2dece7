"""Bad inputs to `trainer train` and `trainer evaluate`, one row a case, through the CLI.

The standard: a user mistake gives exactly one ``error: ...`` line on stderr naming the key, file or
line and the fix, exit status 2 (every command's code for a user error), no traceback, and nothing written where
the command writes: no checkpoint, metrics or config in ``training.output_dir`` (the run lock,
``.lock``, may be there: it is taken before the target loads so that a second run stops early, and
it stays so the lock keeps working), no result file for evaluate and no change to its draft folder.
Add a row here with every new option.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from torchspec.trainer.cli import main

from trainer_test_helpers import assert_one_line_error, save_small_llama_draft, small_overrides


@dataclass
class Env:
    root: Path
    assets: dict
    draft: Path  # an exported draft that fits the assets' target (for evaluate)

    @property
    def out(self) -> Path:  # training.output_dir
        return self.root / "out"

    @property
    def result(self) -> Path:  # evaluate --output
        return self.root / "eval.json"


@dataclass
class Case:
    id: str
    make: Callable[[Env], list[str]]  # the CLI arguments
    words: list[str]  # "{root}" stands for the test's folder
    code: int = 2


@pytest.fixture(scope="module")
def fitting_draft(assets, tmp_path_factory):
    """A small Llama draft for the assets' target (vocab 2048, hidden 64), in serving format."""
    return save_small_llama_draft(tmp_path_factory.mktemp("draft") / "draft", 2048, 32, 64, seed=0)


@pytest.fixture
def env(tmp_path, assets, fitting_draft):
    import shutil

    draft = tmp_path / "draft"
    shutil.copytree(fitting_draft, draft)  # rows may damage it
    return Env(tmp_path, assets, draft)


def train(**extra):
    return lambda env: ["train", *small_overrides(env.assets, env.out, **extra)]


def train_with(make_extra: Callable[[Env], dict]):
    return lambda env: ["train", *small_overrides(env.assets, env.out, **make_extra(env))]


def evaluate(**extra):
    def make(env: Env):
        values = {
            "--draft": str(env.draft),
            "--target": env.assets["target"],
            "--data": env.assets["train_path"],
            "--num-prompts": "1",
            "--max-new-tokens": "2",
            "--output": str(env.result),
            **extra,
        }
        return ["evaluate", *[part for item in values.items() for part in item]]

    return make


def evaluate_with(make_extra: Callable[[Env], dict]):
    return lambda env: evaluate(**make_extra(env))(env)


def _file(env: Env, name: str, text: str) -> str:
    (env.root / name).write_text(text)
    return str(env.root / name)


def _target_without_weights(env: Env) -> str:
    folder = env.root / "target"
    folder.mkdir()
    for file in Path(env.assets["target"]).iterdir():
        if file.suffix != ".safetensors":
            (folder / file.name).write_bytes(file.read_bytes())
    return str(folder)


def _target_with_cut_weights(env: Env) -> str:
    folder = Path(_target_without_weights(env))
    weights = (Path(env.assets["target"]) / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    return str(folder)


def _cut_draft_weights(env: Env) -> dict:
    weights = env.draft / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return {}


def _draft_config_for_another_target(env: Env) -> str:
    from transformers import AutoConfig

    from torchspec.trainer.loop.draft import draft_config_from_target

    values = draft_config_from_target(AutoConfig.from_pretrained(env.assets["target"]))
    values["target_hidden_size"] = 4096
    return _file(env, "draft.json", json.dumps(values))


def _larger_tokenizer(env: Env) -> str:
    from torchspec.data import build_local_tokenizer

    build_local_tokenizer(env.root / "tok", vocab_size=3000)
    return str(env.root / "tok")


CASES = [
    # The config: keys, values, files.
    Case(
        "override-typo",
        train(**{"optimizer.learnig_rate": "1e-3"}),
        ["unknown key optimizer.learnig_rate", "did you mean optimizer.learning_rate?"],
    ),
    Case(
        "key-of-the-0.3-layout",
        train(**{"training.learning_rate": "1e-3"}),
        [
            "training.learning_rate in command-line override",
            "moved to optimizer.learning_rate in torchspec-trainer 0.4.0",
        ],
    ),
    Case(
        "config-file-typo",
        lambda env: ["train", "--config", _file(env, "x.yaml", "model:\n  aux_layer_id: [1, 2, 3]\n")],
        ["unknown key model.aux_layer_id in {root}/x.yaml", "did you mean model.aux_layer_ids?"],
    ),
    Case(
        "config-file-missing",
        lambda env: ["train", "--config", str(env.root / "nope.yaml")],
        ["config file {root}/nope.yaml does not exist"],
    ),
    Case(
        "warmup-set-twice",
        train(**{"lr_schedule.warmup_steps": 5}),  # small_overrides sets warmup_ratio too
        ["lr_schedule.warmup_steps and lr_schedule.warmup_ratio are both set in the command-line overrides; keep one"],
    ),
    Case(
        "learning-rate-nan",
        train(**{"optimizer.learning_rate": ".nan"}),
        ["optimizer.learning_rate must be a finite number > 0, got nan"],
    ),
    # The target.
    Case(
        "target-missing",
        train(**{"model.target_model_path": "/no/such/model"}),
        ["model.target_model_path /no/such/model", "no config.json"],
    ),
    Case(
        "target-without-weights",
        train_with(lambda env: {"model.target_model_path": _target_without_weights(env)}),
        ["model.target_model_path {root}/target has a config.json but no weights", "copy the weight files there"],
    ),
    Case(
        "target-weights-cut",
        train_with(lambda env: {"model.target_model_path": _target_with_cut_weights(env)}),
        ["{root}/target/model.safetensors is damaged or truncated"],
    ),
    Case(
        "aux-layers-out-of-order",
        train(**{"model.aux_layer_ids": "[5, 3, 1]"}),
        [
            "model.aux_layer_ids must be strictly ascending, got [5, 3, 1]",
            "list them in ascending order: [1, 3, 5]",
        ],
    ),
    Case(
        "aux-layers-repeated",
        train(**{"model.aux_layer_ids": "[2, 3, 3]"}),
        ["model.aux_layer_ids repeats layer 3 in [2, 3, 3]", "3 distinct layers"],
    ),
    Case(
        "aux-layers-outside-the-target",
        train(**{"model.aux_layer_ids": "[2, 3, 7]"}),
        ["outside the target's 7 layers", "use ids in [0, 6]"],
    ),
    Case(
        "tokenizer-larger-than-the-vocabulary",
        train_with(lambda env: {"model.tokenizer_path": _larger_tokenizer(env)}),
        ["the tokenizer has 3000 tokens but the target's vocabulary has 2048"],
    ),
    Case(
        "draft-config-for-another-target",
        train_with(lambda env: {"model.draft_config": _draft_config_for_another_target(env)}),
        ["{root}/draft.json", "target_hidden_size=4096 but the target's hidden_size is 64"],
    ),
    Case(
        "draft-vocab-above-the-vocabulary",
        train(**{"model.draft_vocab_size": 5000}),
        ["draft_vocab_size (5000) exceeds vocab_size (2048)"],
    ),
    # The data.
    Case(
        "data-missing",
        train(**{"data.train_path": "/no/such/data.jsonl"}),
        ["data.train_path: ", "/no/such/data.jsonl"],
    ),
    Case(
        "data-empty",
        train_with(lambda env: {"data.train_path": _file(env, "empty.jsonl", "")}),
        ["data.train_path: {root}/empty.jsonl: no records in the file (empty)"],
    ),
    Case(
        "data-hub-name-without-prefix",
        train(**{"data.train_path": "some-org/some-chats"}),
        ["no such file or directory: some-org/some-chats", "write hf://datasets/some-org/some-chats"],
    ),
    Case(
        "data-unusable",
        train_with(lambda env: {"data.train_path": env.assets["broken"]}),
        ["no usable training sample"],
    ),
    Case(
        "data-wrong-prompt-key",
        train(**{"data.prompt_key": "msgs"}),
        ["no 'msgs' key (keys: ['conversations'])", "set prompt_key"],
    ),
    Case(
        "batch-larger-than-the-data",
        train(**{"training.global_batch_size": 64, "training.micro_batch_size": 8}),
        ["fewer than one global batch (64)"],
    ),
    # Resume and extras.
    Case(
        "resume-missing",
        train(**{"checkpoint.resume": "/no/such/checkpoint"}),
        ["checkpoint.resume /no/such/checkpoint"],
    ),
    Case(
        "tensorboard-not-installed",
        train(**{"metrics.tensorboard": "true"}),
        ["pip install tensorboard, or set metrics.tensorboard=false"],
    ),
    # evaluate
    Case(
        "evaluate-draft-without-config",
        evaluate_with(lambda env: {"--draft": str(env.root / "nope")}),
        ["--draft {root}/nope: no config.json there"],
    ),
    Case(
        "evaluate-draft-weights-cut",
        evaluate_with(_cut_draft_weights),
        ["{root}/draft/model.safetensors is damaged or truncated"],
    ),
    Case(
        "evaluate-target-without-weights",
        evaluate_with(lambda env: {"--target": _target_without_weights(env)}),
        ["--target {root}/target has a config.json but no weights"],
    ),
    Case(
        "evaluate-target-weights-cut",
        evaluate_with(lambda env: {"--target": _target_with_cut_weights(env)}),
        ["{root}/target/model.safetensors is damaged or truncated"],
    ),
    Case(
        "evaluate-wrong-prompt-key",
        evaluate(**{"--prompt-key": "msgs"}),
        ["--prompt-key msgs", "no 'msgs' key (keys: ['conversations'])"],
    ),
    Case(
        "evaluate-data-empty",
        evaluate_with(lambda env: {"--data": _file(env, "empty.jsonl", "")}),
        ["{root}/empty.jsonl: no records in the file (empty)"],
    ),
    Case(
        "evaluate-data-missing",
        evaluate_with(lambda env: {"--data": str(env.root / "nope.jsonl")}),
        ["no such file or directory: {root}/nope.jsonl"],
    ),
]


def _written(env: Env) -> list[str]:
    """What the command left where it writes: training.output_dir (its lock aside), the evaluate result."""
    found = [str(p.relative_to(env.root)) for p in env.out.rglob("*") if p.name != ".lock"] if env.out.exists() else []
    return found + ([env.result.name] if env.result.exists() else [])


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_one_line_and_writes_nothing(case, env, capsys):
    if case.id == "tensorboard-not-installed" and importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here")
    args = case.make(env)
    draft_before = _snapshot(env.draft)
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err
    assert_one_line_error(code, err, *[w.replace("{root}", str(env.root)) for w in case.words], expected_code=case.code)
    assert _written(env) == []
    assert _snapshot(env.draft) == draft_before


def test_trainer_errors_are_torchspec_errors():
    from torchspec.draft_models.errors import TorchSpecError, UserInputError
    from torchspec.trainer import ConfigError
    from torchspec.trainer.engine.launch import EngineError

    assert issubclass(ConfigError, UserInputError) and issubclass(ConfigError, ValueError)
    assert issubclass(EngineError, TorchSpecError) and issubclass(EngineError, RuntimeError)


def test_an_unknown_builtin_target_names_the_builtin_ones():
    from torchspec.trainer.config import ConfigError
    from torchspec.trainer.targets.resolve import resolve_target_path

    with pytest.raises(ConfigError) as caught:
        resolve_target_path("builtin:tiny-llama")
    message = str(caught.value)
    assert "\n" not in message and "builtin:tiny-qwen3, builtin:tiny-deepseek-v3" in message
