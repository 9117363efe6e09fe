"""The one typed config of a grpo_jax run: frozen dataclasses mirrored by YAML.

Every YAML key is a dataclass field. A run config is built from the defaults
below, then a YAML file, then dotted command-line overrides (`--grpo.beta=0.04`),
merged and type-checked by OmegaConf, then checked for combinations that make no
sense. Each field's docstring (the string under it) is its `--help` text.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import os
import re
import textwrap
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal, Optional, Sequence, Union

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

DType = Literal["float32", "bfloat16"]
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # model.lora_targets: these, q_proj .. down_proj, or:
LORA_ALL_LINEAR = "all-linear"

# The allowed values of the settings other modules check too: one home, imported there.
RematPolicy = Literal["none", "full", "nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
                      "everything_saveable"]
AttentionImpl = Literal["auto", "dense", "blockwise", "splash", "cudnn"]
LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo"]
ImportanceSamplingLevel = Literal["token", "sequence"]
Algorithm = Literal["grpo", "ppo"]
KLEstimator = Literal["k1", "k3"]
KLPenalty = Literal["reward", "loss"]
RewardScale = Literal["group", "batch", "none", "rloo"]
OverlongPrompts = Literal["truncate_left", "drop"]
OnError = Literal["stop", "none"]
ResumeMode = Literal["auto", "override", "new_dir"]
REMAT_POLICIES: tuple[str, ...] = typing.get_args(RematPolicy)
ATTENTION_IMPLS: tuple[str, ...] = typing.get_args(AttentionImpl)
LOSS_TYPES: tuple[str, ...] = typing.get_args(LossType)
IMPORTANCE_SAMPLING_LEVELS: tuple[str, ...] = typing.get_args(ImportanceSamplingLevel)
KL_ESTIMATORS: tuple[str, ...] = typing.get_args(KLEstimator)
REWARD_SCALES: tuple[str, ...] = typing.get_args(RewardScale)
OVERLONG_PROMPTS: tuple[str, ...] = typing.get_args(OverlongPrompts)
ON_ERROR: tuple[str, ...] = typing.get_args(OnError)

# The settings a run may change when it resumes (how long, how often, where it logs, how it fits
# the hardware): a value here may differ from the run dir's config.yaml. Every other key is the
# run's identity (what it trains, on what, how) and a changed one refuses to resume (run.resume).
# An entry ending in "." covers its whole section.
RESUMABLE_KEYS: tuple[str, ...] = (
    "run.name", "run.steps", "run.output_dir", "run.resume", "run.eval_every", "run.eval_max_examples",
    "run.max_skipped_updates", "run.sized_for", "logging.", "checkpoint.", "mesh.", "sft.", "distill.", "pipeline.",
    "rewards.num_workers",
    "model.remat", "model.attention_impl", "model.attention_block_q", "model.attention_block_kv",
    "model.mlp_chunk_size", "grpo.micro_batch_size", "data.eval_split", "data.num_eval_examples",
    "data.tfds_manual_dir",
)
# Keys that once existed, and what replaced them (an old config names its key's new home).
RENAMED_KEYS = {"checkpoint.resume": "run.resume (auto | override | new_dir)"}


class ConfigError(ValueError):
    """A config that cannot run; its message is one line meant for the user."""


@dataclass(frozen=True)
class ModelConfig:
    path: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    """HF hub id or local folder (config.json + *.safetensors + tokenizer files)."""
    tokenizer: Optional[str] = None
    """Tokenizer hub id or folder; defaults to `path`."""
    param_dtype: DType = "float32"
    """dtype the weights are stored and updated in."""
    compute_dtype: DType = "float32"
    """dtype of matmuls and activations; log-probs and losses are always float32."""
    remat: RematPolicy = "none"
    """Gradient checkpointing policy of each decoder layer ("none" keeps all activations; "full" keeps
    only each layer's input, the residual stream, and recomputes the rest in the backward pass; the
    others are the `jax.checkpoint_policies` of that name, "full" = nothing_saveable)."""
    attention_impl: AttentionImpl = "auto"
    """Attention backend: dense ([T, T] scores), blockwise (flash-style, O(T) memory, any backend),
    splash (Pallas TPU kernel), cudnn (GPU); auto: splash on TPU, cudnn on GPU where it applies,
    blockwise otherwise; on CPU dense up to 2048 keys. A backend that cannot run a call falls back
    to blockwise and logs why."""
    attention_block_q: int = 512
    """Query block of the blockwise and splash backends."""
    attention_block_kv: int = 512
    """Key / value block of the blockwise and splash backends."""
    mlp_chunk_size: int = 0
    """> 0: each layer's MLP runs this many sequence positions at a time, rematerialised, so its
    [rows, T, intermediate] buffers never exist whole (long traces: e.g. 2048); 0: the whole sequence."""

    lora_rank: int = 0
    """> 0: train LoRA adapters of this rank on the frozen base weights (the optimizer sees only the
    adapters; the reference policy is the base with them off); 0: full fine-tuning."""
    lora_alpha: Optional[float] = None
    """LoRA scale numerator: the adapter adds (alpha / rank) B A x; default 2 x rank."""
    lora_dropout: float = 0.0
    """Dropout on each adapter's input in the update's passes (PEFT's lora_dropout; 0 keeps the
    update's log-probs those of the policy that sampled)."""
    lora_targets: tuple[str, ...] = ("all-linear",)
    """The weights that get adapters: q, k, v, o, gate, up, down (or q_proj, ...); all-linear: all seven."""
    lora_base_dtype: Optional[DType] = None
    """dtype the frozen base is kept in (bfloat16 halves it); default model.param_dtype, which the
    adapters and their optimizer state keep."""
    lora_init_from: Optional[str] = None
    """A PEFT adapter folder (adapter_config.json + adapter_model.safetensors) to start the adapters from."""

    def decoder_overrides(self) -> dict:
        """The TransformerConfig fields this section sets on a loaded model (dtypes, remat, attention)."""
        return dict(param_dtype=self.param_dtype, compute_dtype=self.compute_dtype, remat_policy=self.remat,
                    attention_impl=self.attention_impl, attention_block_q=self.attention_block_q,
                    attention_block_kv=self.attention_block_kv, mlp_chunk=self.mlp_chunk_size)


@dataclass(frozen=True)
class RolloutConfig:
    group_size: int = 8
    """G: completions sampled per prompt; advantages compare them within the group."""
    max_prompt_length: int = 256
    """Prompts longer than this are truncated or dropped (data.overlong_prompts)."""
    max_completion_length: int = 256
    """N: most tokens generated per completion."""
    temperature: float = 1.0
    """Sampling temperature; 0 means greedy."""
    top_k: int = 0
    """Keep only the k most likely tokens (0: off)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens with mass >= top_p (1: off)."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p x the top token's (0: off)."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra stop tokens besides the tokenizer's EOS (e.g. a chat end-of-turn id)."""
    prompt_length_buckets: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)
    """Prompts are padded up to the next bucket so a run compiles a handful of programs."""


@dataclass(frozen=True)
class GRPOConfig:
    beta: float = 0.04
    """KL penalty coefficient (k3 estimator against the frozen reference); 0 skips the reference model."""
    epsilon: float = 0.2
    """Lower clip range: the ratio is clipped at 1 - epsilon."""
    epsilon_high: Optional[float] = None
    """Upper clip range (DAPO clip-higher); defaults to epsilon."""
    delta: Optional[float] = None
    """Dual clip: cap the unclipped ratio at delta (must exceed 1 + epsilon_high); off when null."""
    loss_type: LossType = "grpo"
    """How token losses are averaged, as TRL defines them."""
    importance_sampling_level: ImportanceSamplingLevel = "token"
    """"token": one ratio per token (GRPO); "sequence": one ratio per completion (GSPO)."""
    scale_rewards: RewardScale = "group"
    """Advantage: (r - group mean) / std of the group, of the batch, not scaled (Dr. GRPO), or leave-one-out (RLOO)."""
    advantage_eps: float = 1e-4
    """Added to the std before dividing."""
    num_iterations: int = 1
    """mu: optimisation passes over each generation batch (>1 makes the ratio differ from 1)."""
    num_minibatches: int = 1
    """Split each generation batch into this many minibatches per pass (one optimizer update each)."""
    micro_batch_size: Union[int, str] = 0
    """Rows (completions, over the whole mesh) per forward/backward pass: each update's gradients are
    accumulated over minibatch / micro_batch_size passes, and the reference / old log-prob passes run
    in pieces this size, which bounds activation memory. 0: the whole minibatch at once; "auto": the
    largest that fits the device, found by compiling candidates at start-up (as `plan` reports)."""
    pack_sequences: bool = False
    """Pack several (prompt + completion) sequences into each row of the update and log-prob passes
    (segment ids keep attention inside a sequence), instead of padding every row to the longest:
    the same loss and gradients, less work when lengths vary. Needs num_minibatches = 1."""
    pack_length: int = 0
    """Tokens per packed row; 0: the padded width (longest prompt bucket + max_completion_length)."""
    mask_truncated_completions: bool = False
    """Exclude completions that hit max_completion_length without a stop token from the loss (DAPO)."""
    filter_zero_std_groups: bool = False
    """Leave groups whose rewards are all equal out of the loss and its token counts (DAPO dynamic sampling,
    without resampling)."""
    ref_sync_steps: int = 0
    """Every N steps move the reference toward the policy: ref = alpha * policy + (1 - alpha) * ref (TR-DPO);
    0: frozen."""
    ref_mixup_alpha: float = 0.6
    """alpha of the reference sync."""
    cispo_epsilon_high: float = 5.0
    """loss_type=cispo (MiniMax-M1): the importance weight is clipped to at most this (TRL's epsilon_high
    for cispo; no lower bound by default)."""
    cispo_epsilon_low: Optional[float] = None
    """loss_type=cispo: also clip the weight below at 1 - this; null: no lower bound (TRL)."""
    use_bias_correction_kl: bool = False
    """Multiply the per-token k3 KL term by the importance ratio pi / pi_old (not detached: it changes the
    gradient even on-policy), as TRL 1.16's use_bias_correction_kl (default on there), which makes the KL
    gradient the unbiased reverse-KL gradient (DeepSeek-V3.2)."""
    tis_cap: Optional[float] = None
    """Truncated importance sampling (TRL's vllm_importance_sampling_correction, verl's TIS): multiply each
    token's surrogate loss (not the KL term) by min(pi_old / pi_sampler, tis_cap), pi_sampler being the
    log-probs the sampler reported, correcting for them differing from the trainer's (bfloat16 rollouts);
    null: off. TRL's *_truncate modes with vllm_importance_sampling_clip_max = tis_cap."""
    tis_level: ImportanceSamplingLevel = "token"
    """tis_cap per token, or one weight per completion from its summed log-ratio (sequence, as TRL)."""

    @property
    def epsilon_upper(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


@dataclass(frozen=True)
class PPOConfig:
    critic_path: Optional[str] = None
    """run.algorithm=ppo: the model the critic (value model) starts from: any model.path the project loads,
    a converted checkpoint, an HF causal LM, or an HF *ForSequenceClassification folder with one label
    (a TRL reward / value model, whose score head it keeps); null: the policy's own weights. Its vocabulary
    must be the policy's."""
    critic_learning_rate: Optional[float] = None
    """The critic's own optimizer's peak learning rate (optim's other settings apply); null: optim.learning_rate."""
    vf_coef: float = 0.1
    """Weight of the value loss (TRL's vf_coef)."""
    cliprange_value: float = 0.2
    """The new values are clipped to old values +- this in the value loss (TRL's cliprange_value)."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    kl_penalty: KLPenalty = "reward"
    """Where grpo.beta's KL to the reference goes: reward subtracts beta x KL from every token's reward
    (PPO-RLHF, TRL's PPOTrainer); loss adds GRPO's k3 term to the loss instead."""
    kl_estimator: KLEstimator = "k1"
    """The per-token KL in the reward: k1 = log pi - log ref (TRL's default), k3 = Schulman's k3."""
    whiten_rewards: bool = False
    """Whiten the per-token rewards over the batch before GAE (mean kept; TRL's whiten_rewards)."""
    whiten_advantages: bool = True
    """Whiten the GAE advantages over the batch's completion tokens (TRL always does)."""


@dataclass(frozen=True)
class OptimConfig:
    optimizer: Literal["adamw", "adafactor", "sgd"] = "adamw"
    """optax optimizer."""
    learning_rate: float = 1e-6
    """Peak learning rate."""
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Decay after warmup, to 0 at run.steps."""
    warmup_steps: int = 0
    """Linear warmup from 0 to learning_rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    b1: float = 0.9
    """Adam beta1."""
    b2: float = 0.99
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    max_grad_norm: Optional[float] = 1.0
    """Clip gradients to this global norm; null disables."""


@dataclass(frozen=True)
class DataConfig:
    source: str = "arithmetic"
    """A built-in task name, `jsonl`, `parquet`, `tfds:NAME`, or `reasoning_gym:NAME`."""
    path: Optional[str] = None
    """File or folder for the jsonl / parquet sources."""
    split: str = "train"
    """Split to train on."""
    eval_split: Optional[str] = "test"
    """Held-out split for evaluation (null: none)."""
    prompt_column: str = "question"
    """Column holding the prompt text."""
    answer_column: str = "answer"
    """Column holding the reference answer, passed to reward functions."""
    batch_size: int = 8
    """B: prompts per step; each yields group_size completions."""
    system_prompt: Optional[str] = None
    """System prompt text, or a preset name such as `r1`."""
    chat_template: bool = True
    """Wrap prompts in the tokenizer's chat template (when it has one)."""
    assistant_prefix: str = ""
    """Text put after the prompt (after the template's assistant turn start): the model
    continues from it, and rewards see it as the start of each completion. `"<think>\\n"`
    starts R1-style answers for a model that would not open the tag itself."""
    overlong_prompts: OverlongPrompts = "truncate_left"
    """What to do with prompts longer than rollout.max_prompt_length."""
    shuffle: bool = True
    """Shuffle each epoch with run.seed."""
    num_examples: int = 10000
    """Rows in the train split of a procedural source (built-in task, reasoning_gym)."""
    num_eval_examples: int = 500
    """Rows in any other split of a procedural source."""
    task_options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the built-in task generator or the reasoning-gym dataset config."""
    tfds_manual_dir: Optional[str] = None
    """Manual dir for TFDS builders (GSM8K: folder with train.jsonl / test.jsonl); null downloads."""


@dataclass(frozen=True)
class RewardsConfig:
    functions: tuple[str, ...] = ("accuracy", "format")
    """Registry names or `package.module:function` references."""
    weights: tuple[float, ...] = ()
    """One weight per function; empty means all 1."""
    on_error: OnError = "stop"
    """A reward function that raises: stop the run after a checkpoint, or count the reward as None."""
    num_workers: int = 4
    """Threads scoring completions on the host while the device works."""


@dataclass(frozen=True)
class MeshConfig:
    data: int = -1
    """Data-parallel axis size (-1: all devices left over)."""
    fsdp: int = 1
    """Fully sharded data-parallel axis size (params and optimizer state sharded)."""
    tensor: int = 1
    """Tensor-parallel axis size (heads and MLP sharded)."""
    coordinator_address: Optional[str] = None
    """host:port of process 0 for multi-host runs (auto-detected on TPU VMs)."""
    num_processes: Optional[int] = None
    """Processes in a multi-host run (auto-detected on TPU VMs)."""
    process_id: Optional[int] = None
    """This process's index in a multi-host run (auto-detected on TPU VMs)."""


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 50
    """Save every N steps (and at the end); 0 saves only at the end."""
    keep: int = 3
    """Keep the last N checkpoints."""
    keep_best_metric: Optional[str] = None
    """Also keep the best checkpoint by this eval metric (e.g. eval/accuracy)."""
    keep_best_mode: Literal["max", "min"] = "max"
    """Whether a higher or a lower keep_best_metric is better."""
    async_save: bool = True
    """Write checkpoints in the background while training continues."""
    save_timeout_s: int = 600
    """Longest wait for a checkpoint write to finish (a stuck or failed disk stops the run after this)."""


@dataclass(frozen=True)
class LoggingConfig:
    every_steps: int = 1
    """Log metrics every N steps."""
    jsonl: bool = True
    """Write metrics.jsonl in the run dir."""
    tensorboard: bool = False
    """Write TensorBoard event files in the run dir."""
    wandb: bool = False
    """Also log to Weights & Biases (needs `pip install wandb` and a login or WANDB_MODE=offline)."""
    wandb_project: str = "grpo_jax"
    """W&B project; the run is named after run.name."""
    log_completions: int = 2
    """Sample completions printed at each log step."""
    progress_bar: bool = True
    """A live progress bar with the key numbers when the console is a terminal (plain lines otherwise)."""
    peak_tflops_per_device: Optional[float] = None
    """Peak dense TFLOP/s of one device (e.g. 989 for an H100 in bf16); when set, train-step MFU is logged."""


@dataclass(frozen=True)
class SFTConfig:
    steps: int = 200
    """Supervised updates (`python -m launch sft`, or the demo's warm start)."""
    batch_size: int = 32
    """(prompt, completion) pairs per update."""
    learning_rate: float = 1e-3
    """Peak learning rate (AdamW, warmup then cosine decay; optim's other settings apply)."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    completion_template: str = "{answer}"
    """The target completion, formatted from the row's columns
    (e.g. "<think>{solution}</think><answer>{answer}</answer>")."""
    max_completion_length: int = 64
    """Target tokens kept per example (EOS included)."""


@dataclass(frozen=True)
class DistillConfig:
    teacher: Optional[str] = None
    """The model that writes the corpus (any model.path the project loads); null: model.path itself,
    which makes `distill` rejection sampling (STaR / RFT) of the policy."""
    teacher_tokenizer: Optional[str] = None
    """The teacher's tokenizer; defaults to the teacher's own (model.tokenizer when teacher is null)."""
    num_prompts: int = 256
    """Prompts of data.split to sample from, in the data order of run.seed (0: all of them)."""
    samples_per_prompt: int = 8
    """K: completions sampled per prompt (rollout's temperature, top_p, ... and max_completion_length)."""
    keep: Literal["best", "all", "shortest"] = "best"
    """Per prompt, of the completions whose total reward is >= min_reward: the highest-reward one
    (best, the shortest on ties), every one (all), or the shortest (shortest)."""
    min_reward: float = 1.0
    """The total weighted reward (rewards.functions x rewards.weights) a completion needs to be kept."""
    keep_truncated: bool = False
    """Also keep completions cut off at rollout.max_completion_length (by default they are dropped:
    fine-tuning on them teaches the model to stop mid-thought)."""


@dataclass(frozen=True)
class PipelineConfig:
    stages: tuple[Any, ...] = ()
    """`python -m launch pipeline`: the stages in order, each a mapping with `kind` (distill | sft |
    train | eval), an optional `name`, and `overrides` (config keys, nested or dotted, applied on top
    of this config for that stage only). Each stage's output model feeds the next."""


@dataclass(frozen=True)
class RunConfig:
    algorithm: Algorithm = "grpo"
    """grpo: the group's rewards are the baseline (no critic); ppo: a critic (value model, the `ppo`
    section) and GAE give per-token advantages; rollout.group_size then defaults to 1 and grpo.loss_type
    to bnpo (TRL's PPOTrainer)."""
    name: str = "grpo"
    """Run name, used in logs."""
    seed: int = 0
    """Seed for params init, data order and sampling."""
    steps: int = 100
    """GRPO steps (generation batches) to run."""
    output_dir: str = "runs/grpo"
    """Where the resolved config, metrics, plots and checkpoints go."""
    eval_every: int = 0
    """Evaluate on data.eval_split every N steps (0: only at start and end)."""
    eval_max_examples: int = 128
    """Held-out prompts scored per evaluation (greedy, one completion each)."""
    max_skipped_updates: int = 3
    """Stop after this many steps in a row with a non-finite loss or gradient."""
    resume: ResumeMode = "auto"
    """A run dir belongs to one run. auto: resume its newest valid checkpoint when the config's
    training settings equal the saved config.yaml's, refuse with the differences otherwise;
    override: resume it under the changed settings (the old config is kept as config.<step>.yaml);
    new_dir: leave it alone and start afresh in the first free <output_dir>-N."""
    sized_for: tuple[str, ...] = ()
    """Hardware this config is sized to fit, e.g. [h100x1, v5e-8] (KINDxN GPUs or KIND-N TPU chips);
    `python -m launch plan --config C --target sized_for` checks each, and the test suite does too."""


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    run: RunConfig = field(default_factory=RunConfig)


# ---------------------------------------------------------------- loading


def load_config(path: Optional[str | os.PathLike] = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- YAML file <- `section.key=value` overrides, validated.

    Raises ConfigError with a one-line message for unknown keys (naming the
    nearest valid key), wrong types (naming the field and expected type) and
    invalid combinations.
    """
    merged = OmegaConf.structured(Config)
    layers = []
    if path is not None:
        layers.append((_read_yaml(path), str(path)))
    if overrides:
        layers.append((_parse_overrides(overrides), None))
    for layer, source in layers:  # one layer at a time, so an error names where the bad value came from
        merged = _merge_layer(merged, layer, source)
    return _finish(_algorithm_defaults(merged, [layer for layer, _ in layers], switched=True))


def apply_overrides(cfg: Config, overrides: dict, source: str) -> Config:
    """`cfg` with `overrides` on top: a mapping of sections (`{sft: {steps: 60}}`) or dotted keys
    (`{"sft.steps": 60}`), checked and validated as a config file is; `source` names it in errors."""
    if not isinstance(overrides, dict):
        raise ConfigError(f"{source}: expected a mapping of config keys, got {overrides!r}")
    nested: dict = {}
    for key, value in overrides.items():
        section, dot, leaf = str(key).partition(".")
        if dot:
            nested.setdefault(section, {})[leaf] = value
        elif isinstance(value, dict):
            nested.setdefault(section, {}).update(value)
        else:
            raise ConfigError(f"{source}: {_unknown_key_message(str(key))}")
    layer = OmegaConf.create(nested)
    merged = _merge_layer(OmegaConf.structured(cfg), layer, source)
    merged = _algorithm_defaults(merged, [layer], switched=cfg.run.algorithm != merged.run.algorithm)
    try:
        return _finish(merged)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


PPO_DEFAULTS = {"rollout.group_size": 1, "grpo.loss_type": "bnpo"}  # TRL's PPOTrainer: one sample, token mean


def _algorithm_defaults(merged, layers, switched: bool):
    """run.algorithm=ppo samples one completion per prompt and averages the loss over tokens (TRL's PPO)
    unless those keys are set (the defaults are GRPO's); `switched`: these layers chose the algorithm
    (a pipeline stage's overrides may switch it)."""
    if merged.run.algorithm != "ppo" or not switched:
        return merged
    for key, value in PPO_DEFAULTS.items():
        if not any(OmegaConf.select(layer, key) is not None for layer in layers):
            section, name = key.split(".")
            merged = OmegaConf.merge(merged, {section: {name: value}})
    return merged


def _merge_layer(merged, layer, source):
    _check_keys(OmegaConf.to_container(layer), source)
    try:
        return OmegaConf.merge(merged, layer)
    except OmegaConfBaseException as e:
        raise ConfigError(_explain(e, source)) from None


def _finish(merged) -> Config:
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(_explain(e, source=None)) from None
    validate(cfg)
    return cfg


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (YAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path) -> Any:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as f:
            data = yaml.load(f, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model:, grpo:, ...), got {type(data).__name__}")
    return OmegaConf.create(data)


def _parse_overrides(overrides: Sequence[str]) -> Any:
    """`--a.b=c`, `a.b=c` or the pair `--a.b c` -> an OmegaConf dotlist."""
    dotlist, items, i = [], list(overrides), 0
    while i < len(items):
        item = items[i]
        if not item.startswith("--") and "=" not in item:
            raise ConfigError(f"unexpected argument {item!r}: config overrides look like --section.key=value")
        key = item[2:] if item.startswith("--") else item
        if "=" not in key:
            if i + 1 >= len(items) or items[i + 1].startswith("--"):
                raise ConfigError(f"--{key} needs a value: --{key}=VALUE")
            key, i = f"{key}={items[i + 1]}", i + 1
        name = key.split("=", 1)[0]
        if "." not in name:
            raise ConfigError(_unknown_key_message(name))
        dotlist.append(key)
        i += 1
    # A text field takes the text as typed: `--sft.completion_template={teacher}` is a
    # template, not a YAML mapping, and `--run.name=007` stays "007". In double quotes it is
    # a YAML string, escapes included: `--data.assistant_prefix="<think>\n"` ends in a newline.
    texts = [item.split("=", 1) for item in dotlist if _is_text_field(item.split("=", 1)[0])]
    try:
        layer = OmegaConf.from_dotlist([item for item in dotlist if not _is_text_field(item.split("=", 1)[0])])
    except OmegaConfBaseException as e:
        raise ConfigError(_explain(e, source=None)) from None
    for name, value in texts:
        OmegaConf.update(layer, name, _text_value(name, value), force_add=True)
    return layer


def _text_value(name: str, value: str) -> Optional[str]:
    if value in ("null", "~"):
        return None
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return str(yaml.safe_load(value))
        except yaml.YAMLError as e:
            raise ConfigError(f"--{name}: {value} is not a valid double-quoted string "
                              f"({str(e).splitlines()[0]})") from None
    return value


def _is_text_field(dotted: str) -> bool:
    """True for `section.key` naming a str (or Optional[str]) field."""
    section, _, key = dotted.partition(".")
    owner = next((f.default_factory for f in dataclasses.fields(Config) if f.name == section), None)
    field_ = next((f for f in dataclasses.fields(owner) if f.name == key), None) if owner else None
    return field_ is not None and field_.type in ("str", "Optional[str]", str, Optional[str])


def _check_keys(tree: dict, source) -> None:
    """Unknown keys, named by their full dotted path, before OmegaConf sees them."""
    where = f"{source}: " if source else ""
    sections = {f.name: f.default_factory for f in dataclasses.fields(Config)}
    for section, values in tree.items():
        if section not in sections:
            leaf = next(iter(values), None) if isinstance(values, dict) and values else None
            raise ConfigError(where + _unknown_key_message(f"{section}.{leaf}" if leaf else str(section)))
        if not isinstance(values, dict):
            raise ConfigError(f"{where}{section}: expected a mapping of keys, got {values!r}")
        names = {f.name for f in dataclasses.fields(sections[section])}
        for key in values:
            if key not in names:
                raise ConfigError(where + _unknown_key_message(f"{section}.{key}"))


def _explain(e: OmegaConfBaseException, source) -> str:
    key = getattr(e, "full_key", None) or "?"
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    where = f"{source}: " if source else ""
    if "not in" in first or type(e).__name__ == "ConfigKeyError":
        return where + _unknown_key_message(key)
    expected = _expected_type(key)
    if expected and "expected" not in first:
        return f"{where}{key}: {first.rstrip('.')}; expected {expected}"
    return f"{where}{key}: {first}"


def _unknown_key_message(key: str) -> str:
    if key in RENAMED_KEYS:
        return f"config key {key} was replaced by {RENAMED_KEYS[key]}"
    keys = all_keys()
    matches = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not matches:  # a right key in the wrong section: compare the last part only
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in keys}
        near = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
        matches = [by_leaf[near[0]]] if near else []
    if not matches:  # maybe a section name
        sections = [f.name for f in dataclasses.fields(Config)]
        near = difflib.get_close_matches(key.split(".")[0], sections, n=1, cutoff=0.5)
        matches = near
    hint = f"; did you mean {matches[0]}?" if matches else "; see `python -m launch train --help`"
    return f"unknown config key {key}{hint}"


@lru_cache(maxsize=None)
def all_keys() -> tuple[str, ...]:
    """Every valid dotted key, e.g. `grpo.beta`."""
    return tuple(f"{s.name}.{f.name}" for s in dataclasses.fields(Config)
                 for f in dataclasses.fields(s.default_factory))


def _field(key: str):
    section, _, name = key.partition(".")
    for s in dataclasses.fields(Config):
        if s.name == section:
            for f in dataclasses.fields(s.default_factory):
                if f.name == name:
                    return s.default_factory, f
    return None, None


def _expected_type(key: str) -> Optional[str]:
    cls, f = _field(key)
    return None if f is None else _type_name(typing.get_type_hints(cls)[f.name])


def _type_name(tp) -> str:
    """`Optional[float]` -> "float or null", `Literal['a', 'b']` -> "one of a|b"."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is Literal:
        return "one of " + "|".join(map(str, args))
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if typing.get_origin(tp) is tuple:
        return f"list of {_type_name(args[0])}"
    return getattr(tp, "__name__", str(tp))


# ---------------------------------------------------------------- validation


def minibatch_rows(cfg: Config) -> int:
    """Rows (completions) of one optimizer update: data.batch_size x rollout.group_size / grpo.num_minibatches."""
    return cfg.data.batch_size * cfg.rollout.group_size // max(cfg.grpo.num_minibatches, 1)


def optimizer_updates(cfg: Config) -> int:
    """Optimizer updates in the whole run (the learning-rate schedule's length): run.steps generation
    batches x grpo.num_iterations passes x grpo.num_minibatches."""
    return max(cfg.run.steps, 1) * cfg.grpo.num_iterations * cfg.grpo.num_minibatches


def validate_lora(m: ModelConfig, g: GRPOConfig) -> None:
    """model.lora_*: in range and compatible with the reference sync. model.lora_rank=0 turns LoRA off (the
    other lora_* keys then do nothing), except that adapters to start from need a rank to train them at."""
    if not m.lora_rank:
        if m.lora_init_from:
            raise ConfigError(f"model.lora_init_from={m.lora_init_from} is set but model.lora_rank=0 (full "
                              "fine-tuning); set model.lora_rank to the adapters' rank to train them")
        return
    if m.lora_rank < 0:
        raise ConfigError(f"model.lora_rank={m.lora_rank} must be > 0 (or 0 for full fine-tuning)")
    if m.lora_alpha is not None and m.lora_alpha <= 0:
        raise ConfigError(f"model.lora_alpha={m.lora_alpha} must be > 0")
    if not 0 <= m.lora_dropout < 1:
        raise ConfigError(f"model.lora_dropout={m.lora_dropout} must be in [0, 1)")
    allowed = (*LORA_TARGETS, *(f"{t}_proj" for t in LORA_TARGETS), LORA_ALL_LINEAR)
    unknown = [t for t in m.lora_targets if t not in allowed]
    if unknown or not m.lora_targets:
        raise ConfigError(f"model.lora_targets: {unknown[0] if unknown else 'empty'}; name some of "
                          f"{', '.join(allowed)}")
    if g.beta != 0 and g.ref_sync_steps:
        raise ConfigError("grpo.ref_sync_steps with model.lora_rank > 0: the reference is the base model with the "
                          "adapters off, and it stays the base; set grpo.ref_sync_steps=0")


def validate_ppo(cfg: Config) -> None:
    """run.algorithm=ppo: the ppo section in range, and the GRPO-only settings off."""
    p, g = cfg.ppo, cfg.grpo
    checks = [
        (p.vf_coef >= 0, f"ppo.vf_coef={p.vf_coef} must be >= 0"),
        (p.cliprange_value > 0, f"ppo.cliprange_value={p.cliprange_value} must be > 0"),
        (0 <= p.gamma <= 1 and 0 <= p.lam <= 1, f"ppo.gamma={p.gamma} and ppo.lam={p.lam} must be in [0, 1]"),
        (p.critic_learning_rate is None or p.critic_learning_rate >= 0, "ppo.critic_learning_rate must be >= 0"),
        (not g.filter_zero_std_groups, "grpo.filter_zero_std_groups is GRPO's (groups of equal rewards); "
         "run.algorithm=ppo has no groups: set it false"),
        (not g.pack_sequences, "grpo.pack_sequences is not supported with run.algorithm=ppo (the critic reads "
         "padded rows); use grpo.micro_batch_size to bound memory"),
        (not cfg.model.lora_rank, "model.lora_rank with run.algorithm=ppo: LoRA trains the policy only, and the "
         "critic is a full model; set model.lora_rank=0"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


def validate(cfg: Config) -> None:
    """Combinations that type checks cannot catch; each says why it is wrong."""
    r, g, o, d = cfg.rollout, cfg.grpo, cfg.optim, cfg.data

    def need(ok: bool, msg: str):
        if not ok:
            raise ConfigError(msg)

    ppo = cfg.run.algorithm == "ppo"
    need(r.group_size >= 2 or (ppo and r.group_size >= 1),
         f"rollout.group_size={r.group_size}: GRPO compares completions within a group, so it needs at least 2"
         if not ppo else f"rollout.group_size={r.group_size} must be >= 1")
    need(r.max_prompt_length > 0, "rollout.max_prompt_length must be positive")
    need(r.max_completion_length > 0, "rollout.max_completion_length must be positive")
    need(r.temperature >= 0, f"rollout.temperature={r.temperature} must be >= 0 (0 is greedy)")
    need(r.top_k >= 0, f"rollout.top_k={r.top_k} must be >= 0 (0 turns it off)")
    need(0 < r.top_p <= 1, f"rollout.top_p={r.top_p} must be in (0, 1]")
    need(0 <= r.min_p < 1, f"rollout.min_p={r.min_p} must be in [0, 1)")
    need(all(t >= 0 for t in r.stop_token_ids), "rollout.stop_token_ids must be token ids (>= 0)")
    need(bool(r.prompt_length_buckets) and list(r.prompt_length_buckets) == sorted(set(r.prompt_length_buckets))
         and r.prompt_length_buckets[0] > 0, "rollout.prompt_length_buckets must be positive and strictly increasing")
    need(g.beta >= 0, f"grpo.beta={g.beta} must be >= 0 (0 disables the KL penalty)")
    need(g.epsilon > 0, f"grpo.epsilon={g.epsilon} must be > 0: it is the width of the clip range")
    need(g.epsilon < 1, f"grpo.epsilon={g.epsilon} must be < 1, or the lower clip bound 1 - epsilon is not positive")
    need(g.epsilon_high is None or g.epsilon_high > 0, f"grpo.epsilon_high={g.epsilon_high} must be > 0")
    need(g.delta is None or g.delta > 1 + g.epsilon_upper,
         f"grpo.delta={g.delta} must exceed 1 + epsilon_high = {1 + g.epsilon_upper}, "
         "or it caps ratios the clip already allows")
    need(g.advantage_eps >= 0, "grpo.advantage_eps must be >= 0")
    need(g.ref_sync_steps >= 0 and 0 < g.ref_mixup_alpha <= 1,
         "grpo.ref_sync_steps must be >= 0 and grpo.ref_mixup_alpha in (0, 1]")
    validate_lora(cfg.model, g)
    need(g.cispo_epsilon_high > 0, f"grpo.cispo_epsilon_high={g.cispo_epsilon_high} must be > 0")
    need(g.cispo_epsilon_low is None or 0 < g.cispo_epsilon_low < 1,
         f"grpo.cispo_epsilon_low={g.cispo_epsilon_low} must be in (0, 1) or null")
    need(g.tis_cap is None or g.tis_cap > 0, f"grpo.tis_cap={g.tis_cap} must be > 0 or null (off)")
    if ppo:
        validate_ppo(cfg)
    need(g.num_iterations >= 1, "grpo.num_iterations must be >= 1")
    need(g.num_minibatches >= 1, "grpo.num_minibatches must be >= 1")
    need((d.batch_size * r.group_size) % g.num_minibatches == 0,
         f"data.batch_size x rollout.group_size = {d.batch_size * r.group_size} completions do not split into "
         f"grpo.num_minibatches={g.num_minibatches} equal minibatches")
    need(d.batch_size >= 1, "data.batch_size must be >= 1")
    need(not g.pack_sequences or g.num_minibatches == 1,
         "grpo.pack_sequences needs grpo.num_minibatches=1 (use grpo.micro_batch_size to bound memory)")
    need(g.pack_length == 0 or g.pack_length >= r.max_prompt_length + r.max_completion_length,
         f"grpo.pack_length={g.pack_length} must be 0 (the padded width) or hold the longest sequence: "
         ">= rollout.max_prompt_length + rollout.max_completion_length = "
         f"{r.max_prompt_length + r.max_completion_length}")
    need(cfg.model.attention_block_q >= 1 and cfg.model.attention_block_kv >= 1,
         "model.attention_block_q and model.attention_block_kv must be >= 1")
    need(cfg.model.mlp_chunk_size >= 0, "model.mlp_chunk_size must be >= 0 (0: the whole sequence at once)")
    mb, minibatch = g.micro_batch_size, minibatch_rows(cfg)
    need(mb == "auto" or (isinstance(mb, int) and mb >= 0),
         f"grpo.micro_batch_size={mb!r} must be a number of rows >= 0 (0: the whole minibatch) or auto")
    need(not isinstance(mb, int) or mb == 0 or minibatch % mb == 0,
         f"grpo.micro_batch_size={mb} does not divide a minibatch of {minibatch} rows (data.batch_size x "
         f"rollout.group_size / grpo.num_minibatches); use a divisor, 0 or auto")
    need(o.learning_rate >= 0, "optim.learning_rate must be >= 0")
    need(o.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
    need(o.max_grad_norm is None or o.max_grad_norm > 0, "optim.max_grad_norm must be > 0 or null")
    need(0 <= o.b1 < 1 and 0 <= o.b2 < 1, f"optim.b1={o.b1} and optim.b2={o.b2} must be in [0, 1): they are the "
         "decay rates of Adam's moment averages")
    need(o.eps > 0, f"optim.eps={o.eps} must be > 0")
    need(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0")
    need(all(math.isfinite(w) for w in cfg.rewards.weights),
         f"rewards.weights={list(cfg.rewards.weights)} must be finite numbers")
    need(not cfg.rewards.functions == (), "rewards.functions is empty: GRPO needs at least one reward function")
    need(not cfg.rewards.weights or len(cfg.rewards.weights) == len(cfg.rewards.functions),
         f"rewards.weights has {len(cfg.rewards.weights)} entries for {len(cfg.rewards.functions)} rewards.functions")
    need(cfg.rewards.num_workers >= 1, "rewards.num_workers must be >= 1")
    m = cfg.mesh
    for axis in ("data", "fsdp", "tensor"):
        size = getattr(m, axis)
        need(size == -1 or size >= 1, f"mesh.{axis}={size} must be >= 1, or -1 for the devices left over")
    need([m.data, m.fsdp, m.tensor].count(-1) <= 1, "only one mesh axis may be -1")
    need(cfg.run.steps >= 0, "run.steps must be >= 0")
    need(cfg.run.eval_max_examples >= 1, "run.eval_max_examples must be >= 1")
    need(cfg.run.eval_every >= 0, f"run.eval_every={cfg.run.eval_every} must be >= 0 (0: only at start and end)")
    need(cfg.run.max_skipped_updates >= 1, "run.max_skipped_updates must be >= 1")
    for target in cfg.run.sized_for:
        need(bool(re.fullmatch(r"[a-z0-9-]+?(x|-)\d+", target.strip().lower())),
             f"run.sized_for: {target!r} is not a target name like h100x1 or v5e-8")
    need(cfg.checkpoint.every_steps >= 0 and cfg.checkpoint.keep >= 1,
         "checkpoint.every_steps must be >= 0 and checkpoint.keep >= 1")
    need(cfg.checkpoint.save_timeout_s >= 1, "checkpoint.save_timeout_s must be >= 1")
    best = cfg.checkpoint.keep_best_metric
    need(best is None or best.startswith("eval/"),
         f"checkpoint.keep_best_metric={best!r} must be an evaluation metric, e.g. eval/accuracy or eval/pass@1")
    need(best is None or cfg.data.eval_split is not None,
         f"checkpoint.keep_best_metric={best} needs evaluations: set data.eval_split")
    need(cfg.logging.every_steps >= 1, "logging.every_steps must be >= 1")
    need(cfg.sft.steps >= 0 and cfg.sft.batch_size >= 1 and cfg.sft.max_completion_length >= 1,
         "sft.steps must be >= 0, sft.batch_size and sft.max_completion_length >= 1")
    need(cfg.distill.num_prompts >= 0, "distill.num_prompts must be >= 0 (0: every prompt of data.split)")
    need(cfg.distill.samples_per_prompt >= 1, "distill.samples_per_prompt must be >= 1")
    need(math.isfinite(cfg.distill.min_reward), "distill.min_reward must be a finite number")


# ---------------------------------------------------------------- output


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def flat_dict(cfg: Config) -> dict[str, Any]:
    """{"grpo.beta": 0.04, ...}: every key of the config with its value."""
    return {f"{section}.{key}": value for section, values in to_dict(cfg).items() for key, value in values.items()}


def key_in(key: str, keys: Sequence[str]) -> bool:
    """Whether `key` is one of `keys`, where an entry ending in "." stands for its whole section."""
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in keys)


def is_resumable(key: str) -> bool:
    """Whether `key` may change when a run resumes (RESUMABLE_KEYS)."""
    return key_in(key, RESUMABLE_KEYS)


def identity_changes(saved: Config, new: Config, keys: Optional[Sequence[str]] = None) -> list[str]:
    """The identity settings that differ, as "grpo.beta: 0.04 -> 0.0": a training run's (every key
    but the resumable ones), or with `keys` those keys (another command's identity, e.g. distill's)."""
    old, now = flat_dict(saved), flat_dict(new)
    counts = (lambda key: not is_resumable(key)) if keys is None else (lambda key: key_in(key, keys))
    return [f"{key}: {_show(old[key])} -> {_show(now[key])}" for key in old if old[key] != now[key] and counts(key)]


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, directory: str | os.PathLike) -> str:
    """Write the resolved config as `config.yaml`; loading it back gives the same Config."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "config.yaml")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(to_yaml(cfg))
    os.replace(tmp, path)
    return path


def announce_config(cfg: Config, save: bool = True, show: bool = True) -> Optional[str]:
    """Print the resolved config (show) and, with save, write it into run.output_dir (returns the path).

    An output dir that cannot be written is a ConfigError naming it.
    """
    if show:
        print("resolved config:\n" + to_yaml(cfg).rstrip(), flush=True)
    if not save:
        return None
    try:
        path = save_config(cfg, cfg.run.output_dir)
    except OSError as e:
        raise ConfigError(f"cannot write to run.output_dir {cfg.run.output_dir}: {e.strerror or e}") from None
    print(f"saved to {path}" if show else f"resolved config saved to {path}", flush=True)
    return path


@lru_cache(maxsize=None)
def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a config dataclass (its --help text)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe_fields() -> str:
    """Every config key with its type, default and docstring, for --help."""
    lines = []
    for section in dataclasses.fields(Config):
        cls = section.default_factory
        lines.append(f"{section.name}:")
        docs = field_docs(cls)
        hints = typing.get_type_hints(cls)
        default = cls()
        for f in dataclasses.fields(cls):
            value = getattr(default, f.name)
            lines.append(f"  --{section.name}.{f.name}={_show(value)}  ({_type_name(hints[f.name])})")
            if f.name in docs:
                lines.append(f"      {docs[f.name]}")
    return "\n".join(lines)


def _show(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return str(value)
