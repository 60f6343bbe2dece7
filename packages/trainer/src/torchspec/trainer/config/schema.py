"""The training configuration users read and write: one dataclass per section.

A config is sections of plain dataclasses, each named for what it configures: ``model``, ``target``
(where the target's hidden states come from), ``data``, ``training`` (the run: output, seed,
devices, batches, length), ``optimizer``, ``lr_schedule``, ``ttt``, ``checkpoint`` and ``metrics``.
The defaults are the embedded demo run (a tiny built-in target and the bundled sample
conversations), so ``TrainConfig()`` trains something. Reading files and overrides is
``torchspec.trainer.config.loading``; checks across keys are ``...validation``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from torchspec.draft_models.errors import UserInputError

__all__ = [
    "BUILTIN_SAMPLE_CONVERSATIONS",
    "BUILTIN_TINY_TARGET",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "LRScheduleConfig",
    "MetricsConfig",
    "ModelConfig",
    "OptimizerConfig",
    "TTTConfig",
    "TargetConfig",
    "TrainConfig",
    "TrainingConfig",
]

BUILTIN_TINY_TARGET = "builtin:tiny-qwen3"
BUILTIN_SAMPLE_CONVERSATIONS = "builtin:sample-conversations"


class ConfigError(UserInputError):
    """A configuration mistake the user can fix; the message is one line naming the key and the fix."""


@dataclass
class ModelConfig:
    # A local Hugging Face causal-LM folder, or the built-in tiny Qwen3-style target.
    target_model_path: str = BUILTIN_TINY_TARGET
    # A draft config.json (e.g. configs/draft_models/*.json); null generates one from the target.
    draft_config: str | None = None
    # Architecture of a generated draft (draft_config: null).
    draft_architecture: Literal["llama", "mla"] = "llama"
    # Below the target vocabulary: the draft predicts only the most frequent supervised tokens.
    draft_vocab_size: int | None = None
    # Target layers whose inputs feed the draft (low, mid, high), 3 distinct ids in ascending order (the
    # engines concatenate the states in layer order); null = [2, L//2, L-3] (see default_aux_layer_ids).
    aux_layer_ids: list[int] | None = None
    trust_remote_code: bool = False
    # Target weights; auto = bfloat16 on GPU, float32 on CPU.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Tokenizer folder; null = the target folder.
    tokenizer_path: str | None = None
    # EAGLE-3.1: `true` turns on fc_norm and norm_output, the variant vLLM serves for both architectures.
    eagle3_1: bool = False
    # The single EAGLE-3.1 options; null = as the draft config says (off in a generated one).
    # fc_norm: an RMSNorm per aux hidden state before fc; norm_before_fc: one over their concatenation
    # (Llama drafts only: vLLM's DeepSeek draft lacks it); norm_output: chain the normed hidden state.
    fc_norm: bool | None = None
    norm_before_fc: bool | None = None
    norm_output: bool | None = None


@dataclass
class TargetConfig:
    """Where the target's hidden states come from; ``model.target_model_path`` names the target."""

    # transformers: the target in the trainer's processes | vllm: a vLLM engine in its own process,
    # online, one trainer process | fleet: running `vllm serve` states servers (target.servers), any
    # number of trainer ranks | dump: the files `trainer:dump-states` wrote (no target decoder runs)
    backend: Literal["transformers", "vllm", "fleet", "dump"] = "transformers"
    # vllm: extra vllm.LLM arguments (tensor_parallel_size, gpu_memory_utilization, ...)
    engine_args: dict[str, Any] = field(default_factory=dict)
    engine_devices: str | None = None  # vllm: CUDA_VISIBLE_DEVICES of the engine, e.g. "4,5,6,7"
    # vllm: the python of the environment vLLM is installed in (null: $TORCHSPEC_ENGINE_PYTHON, else this one)
    engine_python: str | None = None
    prefetch_batches: int = 2  # vllm, fleet: global batches the engines work ahead of the draft
    # vllm, fleet: the states asked for and not trained on yet, per rank, stay within this many GiB
    # (the batch being trained is always asked for; null: prefetch_batches alone bounds them)
    prefetch_gib: float | None = 4.0
    engine_timeout_s: float = 900.0  # vllm: longest wait for the engine to start or answer
    dump_dir: str | None = None  # dump (and dump-states' output): the hidden-state dump folder
    # fleet: the states servers' URLs, e.g. [http://node1:8000, http://node2:8000] (`trainer serve-command`)
    servers: list[str] = field(default_factory=list)
    # fleet: how states travel from the servers to the ranks: file (target.states_dir, a folder both
    # see) | mooncake (a Mooncake store over TCP or RDMA, no shared file system: target.mooncake)
    transport: Literal["file", "mooncake"] = "file"
    # fleet, transport file: the folder the servers write states to (shared by servers and trainer ranks)
    states_dir: str | None = None
    # fleet, transport mooncake: the store, as hs-connectors' MooncakeStoreConfig keys
    # (master_server_address, protocol, device_name, global_segment_size, local_buffer_size, ...)
    mooncake: dict[str, Any] = field(default_factory=dict)
    request_timeout_s: float = 120.0  # fleet: a server silent this long on one request is set aside
    # fleet: states servers the trainer starts on each node (its local rank 0), serving that node's
    # ranks, and starts again when they exit (0: the servers in target.servers, started by you)
    start_servers: int = 0
    server_devices: list[str] = field(default_factory=list)  # fleet: CUDA_VISIBLE_DEVICES of each started server
    server_port: int = 8100  # fleet: started server i listens on 127.0.0.1:(server_port + i)
    # vllm, fleet with start_servers: times an engine the trainer started is started again after it exits
    max_engine_restarts: int = 3


@dataclass
class DataConfig:
    train_path: str = BUILTIN_SAMPLE_CONVERSATIONS
    eval_path: str | None = None
    # Share of the training conversations held out for evaluation when eval_path is null.
    eval_split: float = 0.1
    # A torchspec-data template name, or "hf" for the tokenizer's own chat template.
    chat_template: str = "qwen"
    prompt_key: str = "conversations"
    max_seq_length: int = 2048
    num_proc: int = 1
    cache_dir: str | None = None


@dataclass
class TrainingConfig:
    """The run: where it writes, its seed, devices, batch geometry and length."""

    output_dir: str = "outputs/default_llama"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Draft compute dtype; auto = bfloat16 on GPU (fp32 master weights and reductions), float32 on CPU.
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    micro_batch_size: int = 4
    # Samples per optimizer step, across all ranks and accumulation steps.
    global_batch_size: int = 16
    num_epochs: int = 4
    # Overrides num_epochs when set.
    max_steps: int | None = None
    # Gradient-norm clipping before each optimizer step.
    max_grad_norm: float = 1.0
    # Shard the frozen target with FSDP2 too, for targets larger than one device.
    shard_target: bool = False
    # Stop after this many evaluations of the metric that picks best.json (the real acceptance, else
    # the simulated one) without a new best; null = train to the end.
    early_stop_patience: int | None = None


@dataclass
class OptimizerConfig:
    """AdamW (fp32 master weights)."""

    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])


@dataclass
class LRScheduleConfig:
    """The learning-rate multiplier per step: linear warmup, then ``kind``."""

    kind: Literal["cosine", "constant", "wsd"] = "cosine"
    # Two spellings of the warmup length: the file or command line that sets one resets the other
    # (so warmup_steps alone replaces the default ratio); one place setting both is an error.
    warmup_steps: int | None = None
    warmup_ratio: float | None = 0.05
    # WSD: share of the total steps spent decaying at the end.
    decay_ratio: float = 0.1
    # The schedule decays to min_lr_ratio * optimizer.learning_rate.
    min_lr_ratio: float = 0.1


@dataclass
class TTTConfig:
    """Test-time training of the draft: the unroll, the loss weights and its memory."""

    # Draft steps unrolled per position.
    length: int = 7
    # Step k's loss is weighted loss_decay**k.
    loss_decay: float = 0.8
    attention_backend: Literal["sdpa", "flex_attention"] = "sdpa"
    # false: the draft's MLP is recomputed in backward; true: its whole decoder layer (parallelize.py).
    gradient_checkpointing: bool = False


@dataclass
class CheckpointConfig:
    """When checkpoints are saved and kept, and what a run starts from."""

    # Steps between checkpoints (0 = only at the end); the default run saves every 20 of its 108 steps.
    save_interval: int = 20
    # Checkpoints kept (the best one is always kept); null = all.
    keep_last: int | None = 3
    # "auto" (continue from the latest complete checkpoint in output_dir, if any), null (a fresh run;
    # refuses an output_dir holding checkpoints) or a checkpoint folder.
    resume: str | None = "auto"
    # A checkpoint whose draft weights start a new run (optimizer, schedule and data start fresh).
    continual_training: str | None = None


@dataclass
class MetricsConfig:
    """What the run measures and reports, and how often."""

    log_interval: int = 10
    # Steps between evaluations on the held-out set (0 = only at the end).
    eval_interval: int = 40
    # After training, real speculative decoding of this many held-out prompts (0 = off).
    speculative_eval_prompts: int = 8
    # During training: real speculative decoding (greedy, 4 draft tokens) of the first this-many
    # held-out prompts, which then picks best.json (0 = off: the simulated acceptance picks it).
    real_acceptance_prompts: int = 16
    # Steps between real-acceptance measurements (0 = only at the end).
    real_acceptance_interval: int = 40
    # Tokens generated per prompt in those measurements.
    real_acceptance_max_new_tokens: int = 32
    # Real acceptance judged by vLLM serving the target with the draft as trained so far (reloaded
    # into the running server before each measurement): the URL of a judge server you started (the
    # run logs its command) | null. How runs whose target is on an engine (backend vllm, fleet)
    # measure real acceptance; with the in-process target it replaces the in-process evaluator.
    judge_url: str | None = None
    # Or the trainer starts that judge itself on its main node (at the first measurement; started
    # again if it exits), with target.engine_args, on these CUDA_VISIBLE_DEVICES, at 127.0.0.1:judge_port.
    start_judge: bool = False
    judge_devices: str | None = None
    judge_port: int = 8090
    tensorboard: bool = False
    progress_bar: bool = True


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    ttt: TTTConfig = field(default_factory=TTTConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
