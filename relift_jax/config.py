"""Small validated configs: plain frozen dataclasses, the only things a user configures.

Library functions take these (or plain arguments). Gin binds their fields at the edge only:
`relift_jax.main` registers these classes with gin, parses `RLConfig.learning_rate = 1e-6` from a
.gin file and constructs them; nothing in the library reads gin. Every error names the field, the
value and the rule.
"""
from __future__ import annotations

import dataclasses

from relift_jax import model
from relift_jax.attention import IMPLEMENTATIONS
from relift_jax.losses import AGG_MODES, K3_AMBIGUOUS, KL_KINDS, SEQ_NORM_DENOMINATORS
from relift_jax.sharding import MeshConfig

class ConfigError(ValueError):
    """The user's configuration is wrong: a one-line message naming the binding and the rule.

    `python -m relift_jax.main` prints it without a traceback and exits with status 2.
    """


REMAT_POLICIES = tuple(model.REMAT_POLICIES)
ATTENTION_IMPLS = IMPLEMENTATIONS
MODES = ("relift", "rl", "sft", "sft_then_rl", "rl_with_sft_loss", "relift_uniform")


def _check(cond: bool, cls: str, field: str, value, rule: str) -> None:
    if not cond:
        raise ConfigError(f"{cls}.{field} = {value!r}: {rule}")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with global-norm clipping and a schedule (constant, linear or cosine after warmup)."""

    learning_rate: float = 1e-6
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "constant"
    decay_steps: int = 0  # for linear/cosine: steps after warmup to reach final_lr_fraction
    final_lr_fraction: float = 0.0

    def __post_init__(self):
        n = type(self).__name__
        _check(self.learning_rate >= 0, n, "learning_rate", self.learning_rate, "must be >= 0")
        _check(self.grad_clip > 0, n, "grad_clip", self.grad_clip, "must be > 0")
        _check(self.schedule in ("constant", "linear", "cosine"), n, "schedule", self.schedule,
               "must be constant, linear or cosine")
        _check(self.schedule == "constant" or self.decay_steps > 0, n, "decay_steps",
               self.decay_steps, f"must be > 0 for schedule {self.schedule!r}")


def _optim(cfg) -> OptimConfig:
    """The AdamW settings of an RL or SFT config (flat fields, so gin binds them directly)."""
    return OptimConfig(learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
                       grad_clip=cfg.grad_clip, warmup_steps=cfg.warmup_steps)


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """How questions are turned into prompts and sampled (official defaults at 7B scale in comments)."""

    questions_per_iteration: int = 8   # official 128
    group_size: int = 8                # G
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_prompt_len: int = 1024
    max_response_len: int = 8192
    keep_system_prompt: bool = True
    think_prefix: bool = True
    drop_long_prompts: bool = True     # False: a prompt over max_prompt_len is an error
    # The sampler (relift_jax.engine): "continuous" (prefix sharing, attention over the filled
    # cache, continuous batching), "grouped" (the same, rows decoded in groups of similar length,
    # each over its own window) or "dense" (the reference). decode_slots rows decode at once
    # (0: all N x G rows); finished slots are refilled every segment_len decode steps.
    engine: str = "continuous"
    decode_slots: int = 0
    segment_len: int = 32
    # The sampler's own weight layout (rollout.DecodeLayout): 0 = the training layout; T > 0 =
    # weights split T ways over heads/MLP/vocabulary and replicated across the other devices,
    # copied there once per sampling call instead of gathered at every decode step.
    decode_tensor: int = 0
    # Attention of a decode step: "xla" (dense over the segment's window) or "ragged" (a Pallas
    # TPU kernel that reads only each row's filled key blocks; dense elsewhere than TPU/CPU).
    decode_attention: str = "xla"

    def __post_init__(self):
        n = type(self).__name__
        _check(self.questions_per_iteration > 0, n, "questions_per_iteration",
               self.questions_per_iteration, "must be > 0")
        _check(self.group_size > 0, n, "group_size", self.group_size, "must be > 0")
        _check(self.max_response_len > 0, n, "max_response_len", self.max_response_len, "must be > 0")
        _check(self.engine in ("continuous", "grouped", "dense"), n, "engine", self.engine,
               "must be 'continuous', 'grouped' or 'dense'")
        _check(self.decode_slots >= 0, n, "decode_slots", self.decode_slots, "must be >= 0")
        _check(self.segment_len > 0, n, "segment_len", self.segment_len, "must be > 0")
        _check(self.decode_tensor >= 0, n, "decode_tensor", self.decode_tensor, "must be >= 0")
        _check(self.decode_attention in ("xla", "ragged"), n, "decode_attention",
               self.decode_attention, "must be 'xla' or 'ragged'")


OLD_LOGPROBS = ("sampler", "recompute")


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """Policy-gradient step. Defaults are the official ReLIFT (Dr.GRPO-style) ones, except the loss
    scale: `seq_norm_denominator="num_devices"` reproduces the official one (losses.aggregate)."""

    learning_rate: float = 1e-6
    weight_decay: float = 0.01
    grad_clip: float = 0.7
    warmup_steps: int = 0
    num_mini_batches: int = 2
    micro_batch_size: int = 8
    # Sequence packing: micro-batches filled to this many tokens, several sequences per row
    # (None: one sequence per row, micro_batch_size rows).
    tokens_per_micro_batch: int | None = None
    scale_adv_by_std: bool = False
    clip_low: float | None = None
    clip_high: float | None = None
    agg: str = "seq-mean-token-sum-norm"
    norm_len: int | None = None  # None: the rollout's max_response_len (the official 8192)
    # seq-mean-token-sum-norm divides by the number of sequences ("num_seqs", TRL's dr_grpo) or by
    # seq_norm_num_devices ("num_devices": the official ReLIFT scale, a 64x larger gradient at the
    # official shapes, 512 sequences per update / 8 GPUs); see losses.aggregate for the arithmetic.
    seq_norm_denominator: str = "num_seqs"
    seq_norm_num_devices: int = 8  # the official run's 8 data-parallel GPUs, not our mesh size
    # The PPO "old" log-probs: the sampler's ("sampler") or the training forward's at the start of
    # the iteration ("recompute", the official ReLIFT / verl choice: the first ratio is exactly 1).
    old_logprobs: str = "sampler"
    # Truncated importance sampling: each token's loss times min(pi_train / pi_sampler, tis_cap)
    # (None: off). verl and TRL use caps of about 2.
    tis_cap: float | None = None
    # Log rollout/logprob_mismatch_{mean,max} (|training forward - sampler| per response token)
    # every iteration: one extra forward over the RL batch; always on with recompute or TIS.
    log_logprob_mismatch: bool = True
    entropy_coef: float = 0.001
    kl_coef: float = 0.0
    kl_kind: str = "low_var_kl"
    dynamic_filter: bool = False  # drop groups whose rewards are all equal (zero advantage)
    sft_loss_coef: float = 1.0    # mode rl_with_sft_loss: weight of the SFT loss in the RL update

    def __post_init__(self):
        n = type(self).__name__
        _check(self.agg in AGG_MODES, n, "agg", self.agg, f"must be one of {AGG_MODES}")
        _check(self.kl_kind != "k3", n, "kl_kind", self.kl_kind, K3_AMBIGUOUS)
        _check(self.kl_kind in KL_KINDS, n, "kl_kind", self.kl_kind, f"must be one of {KL_KINDS}")
        _check(self.seq_norm_denominator in SEQ_NORM_DENOMINATORS, n, "seq_norm_denominator",
               self.seq_norm_denominator, f"must be one of {SEQ_NORM_DENOMINATORS}")
        _check(self.seq_norm_denominator == "num_seqs" or self.agg == "seq-mean-token-sum-norm",
               n, "seq_norm_denominator", self.seq_norm_denominator,
               f"'num_devices' needs agg 'seq-mean-token-sum-norm', got agg {self.agg!r}")
        _check(self.seq_norm_num_devices > 0, n, "seq_norm_num_devices", self.seq_norm_num_devices,
               "must be > 0")
        _check((self.clip_low is None) == (self.clip_high is None), n, "clip_low/clip_high",
               (self.clip_low, self.clip_high), "give both or neither")
        _check(self.num_mini_batches > 0, n, "num_mini_batches", self.num_mini_batches, "must be > 0")
        _check(self.micro_batch_size > 0, n, "micro_batch_size", self.micro_batch_size, "must be > 0")
        _check(self.old_logprobs in OLD_LOGPROBS, n, "old_logprobs", self.old_logprobs,
               f"must be one of {OLD_LOGPROBS}")
        _check(self.tis_cap is None or self.tis_cap >= 1.0, n, "tis_cap", self.tis_cap,
               "must be None (off) or >= 1")

    @property
    def needs_train_logprobs(self) -> bool:
        """Whether the controller runs the training forward over the rollouts before updating."""
        return self.old_logprobs == "recompute" or self.tis_cap is not None or \
            self.log_logprob_mismatch

    def optim(self) -> OptimConfig:
        return _optim(self)


DEMO_SOURCES = ("column", "teacher")


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """The demonstration buffer and the SFT step (its own AdamW by default, as in the official code)."""

    buffer_size: int = 128            # M
    buffer_order: str = "newest"      # which M questions an SFT step takes: newest or oldest first
    hardest_max_pass_rate: float = 0.0  # a question is "hardest" when its pass rate <= this
    steps_per_trigger: int = 1
    learning_rate: float = 1e-6
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    warmup_steps: int = 0
    # After warmup: "constant", or "linear" / "cosine" decay to final_lr_fraction x learning_rate
    # over decay_steps SFT steps (the toy teacher's recipe decays; ReLIFT keeps it constant).
    schedule: str = "constant"
    decay_steps: int = 0
    final_lr_fraction: float = 0.0
    entropy_coef: float = 0.001
    share_optimizer: bool = False
    micro_batch_size: int = 8
    tokens_per_micro_batch: int | None = None  # sequence packing, as RLConfig
    max_demo_len: int | None = None   # None: the rollout's max_response_len
    uniform_every: int = 4            # mode relift_uniform: SFT every k iterations on random questions
    sft_iterations: int = 0           # mode sft_then_rl: iterations of pure SFT before RL
    sft_questions_per_step: int | None = None  # modes sft / sft_then_rl: None = buffer_size
    # Where a hardest question's demonstration comes from (mode relift): "column" = the dataset's
    # own; "teacher" = the first of TeacherConfig.tries teacher samples that the run's reward
    # accepts (relift_jax.demos). A question without one stays out of the buffer.
    demo_source: str = "column"
    # A question enters the buffer only once it has been hardest in this many visits (across
    # epochs); 1 = at its first hardest visit.
    hardest_visits: int = 1

    def __post_init__(self):
        n = type(self).__name__
        _check(self.buffer_size > 0, n, "buffer_size", self.buffer_size, "must be > 0")
        _check(self.demo_source in DEMO_SOURCES, n, "demo_source", self.demo_source,
               f"must be one of {DEMO_SOURCES}")
        _check(self.hardest_visits >= 1, n, "hardest_visits", self.hardest_visits, "must be >= 1")
        _check(self.buffer_order in ("newest", "oldest"), n, "buffer_order", self.buffer_order,
               "must be newest or oldest")
        _check(0.0 <= self.hardest_max_pass_rate < 1.0, n, "hardest_max_pass_rate",
               self.hardest_max_pass_rate, "must be in [0, 1)")
        _check(self.steps_per_trigger > 0, n, "steps_per_trigger", self.steps_per_trigger,
               "must be > 0")
        _check(self.uniform_every > 0, n, "uniform_every", self.uniform_every, "must be > 0")
        _check(self.schedule in ("constant", "linear", "cosine"), n, "schedule", self.schedule,
               "must be constant, linear or cosine")
        _check(self.schedule == "constant" or self.decay_steps > 0, n, "decay_steps",
               self.decay_steps, f"must be > 0 for schedule {self.schedule!r}")

    def optim(self) -> OptimConfig:
        return dataclasses.replace(_optim(self), schedule=self.schedule,
                                   decay_steps=self.decay_steps,
                                   final_lr_fraction=self.final_lr_fraction)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The run: which controller mode, how long, and when to evaluate, save and log."""

    mode: str = "relift"
    iterations: int = 100
    seed: int = 0
    eval_every: int = 10          # 0: only at the end
    eval_questions: int | None = None  # None: the whole held-out split
    eval_samples: int = 1
    eval_temperature: float = 0.6
    save_every: int = 10
    keep_checkpoints: int = 2
    log_rollouts: int = 2         # sampled rollouts written as text at each evaluation
    reward: str = "math"
    reward_workers: int = 2
    reward_timeout_s: float = 5.0
    require_think_close: bool = True
    export_best: bool = True
    resume: bool = True
    # > 0: evaluate the starting and the final policy with this many samples per held-out question
    # and bucket the results by level and by the starting model's pass rate (the paper's analysis).
    bucket_samples: int = 0

    def __post_init__(self):
        n = type(self).__name__
        _check(self.mode in MODES, n, "mode", self.mode, f"must be one of {MODES}")
        _check(self.iterations > 0, n, "iterations", self.iterations, "must be > 0")
        _check(self.save_every >= 0, n, "save_every", self.save_every, "must be >= 0")
        _check(self.eval_every >= 0, n, "eval_every", self.eval_every, "must be >= 0")


@dataclasses.dataclass(frozen=True)
class ModelLoadConfig:
    """Which Hugging Face folder to start from and in which numerics to train it."""

    path: str | None = None            # None: random init from `random_init` (toy models)
    tokenizer_path: str | None = None  # None: the model folder
    random_init: dict | None = None    # ModelConfig fields, e.g. {"hidden_size": 256, ...}
    # When `path` does not exist: build it first by running this gin file into build_run_dir
    # (the toy base model; its export/final must be `path`).
    build_gin: str | None = None
    build_run_dir: str | None = None
    param_dtype: str = "float32"      # bfloat16: bf16 weights (optimiser moments stay float32)
    compute_dtype: str = "float32"    # bfloat16: bf16 matmuls (softmax, norms, losses in float32)
    remat: str = "none"               # none | full | save_matmuls (recompute in the backward pass)
    attention: str = "xla"            # xla (dense) | blockwise | splash (TPU) | cudnn (GPU)
    # Positions per vocabulary-projection chunk in the train steps (0: all at once); with a large
    # vocabulary this is what keeps [b, T, V] float32 logits from ever existing.
    logits_chunk_len: int = 0
    trust_remote_code: bool = False

    def __post_init__(self):
        n = type(self).__name__
        if isinstance(self.remat, bool):  # the old spelling
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        _check(self.remat in REMAT_POLICIES, n, "remat", self.remat,
               f"must be one of {REMAT_POLICIES}")
        _check(self.attention in ATTENTION_IMPLS, n, "attention", self.attention,
               f"must be one of {ATTENTION_IMPLS}")
        _check(self.logits_chunk_len >= 0, n, "logits_chunk_len", self.logits_chunk_len,
               "must be >= 0")
        _check(self.path is not None or (self.random_init and self.tokenizer_path), n, "path",
               self.path, "give a Hugging Face folder, or random_init and tokenizer_path")


DTYPES = tuple(model._DTYPES)


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """The teacher that writes demonstrations when SFTConfig.demo_source = 'teacher' (mode relift).

    A Hugging Face folder sampled with the run's own sampler, on its own copy of the weights over
    the run's devices, with its own tokenizer and stop ids; `tries` samples per hardest question,
    the first the run's reward accepts becomes the demonstration (relift_jax.demos).
    """

    path: str | None = None            # a Hugging Face folder (required with demo_source 'teacher')
    tokenizer_path: str | None = None  # None: the teacher's folder; 'toy': the toy tokenizer
    # When `path` does not exist: build it first by running this gin file into build_run_dir
    # (the toy teacher; its export/final must be `path`), as ModelLoadConfig.build_gin.
    build_gin: str | None = None
    build_run_dir: str | None = None
    tries: int = 4                     # k samples per question; the first accepted one is kept
    temperature: float = 1.0
    max_response_len: int | None = None  # None: the rollout's max_response_len
    decode_tensor: int = 0             # its sampler's weight layout, as RolloutConfig.decode_tensor
    param_dtype: str = "float32"
    compute_dtype: str = "float32"

    def __post_init__(self):
        n = type(self).__name__
        _check(self.tries > 0, n, "tries", self.tries, "must be > 0")
        _check(self.temperature >= 0, n, "temperature", self.temperature, "must be >= 0")
        _check(self.max_response_len is None or self.max_response_len > 0, n, "max_response_len",
               self.max_response_len, "must be None (the rollout's) or > 0")
        _check(self.decode_tensor >= 0, n, "decode_tensor", self.decode_tensor, "must be >= 0")
        _check(self.param_dtype in DTYPES, n, "param_dtype", self.param_dtype,
               f"must be one of {DTYPES}")
        _check(self.compute_dtype in DTYPES, n, "compute_dtype", self.compute_dtype,
               f"must be one of {DTYPES}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Training and held-out data files (ReLIFT/LUFFY parquet or jsonl, or the plain schema)."""

    train: str | None = None  # required
    heldout: str | None = None
    heldout_fraction: float = 0.0  # without a held-out file: this fraction of train, split off
    shuffle: bool = True

    def __post_init__(self):
        n = type(self).__name__
        _check(self.train is not None, n, "train", self.train,
               "required: a parquet/jsonl file, a datasets folder or a toy:... spec")
        _check(0.0 <= self.heldout_fraction < 1.0, n, "heldout_fraction", self.heldout_fraction,
               "must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything one training run reads: what `train.run(run_dir, configs)` takes."""

    model: ModelLoadConfig
    data: DataConfig
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    rl: RLConfig = dataclasses.field(default_factory=RLConfig)
    sft: SFTConfig = dataclasses.field(default_factory=SFTConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    teacher: TeacherConfig = dataclasses.field(default_factory=TeacherConfig)

    def __post_init__(self):
        _check(self.sft.hardest_visits == 1 or self.train.mode == "relift", "SFTConfig",
               "hardest_visits", self.sft.hardest_visits,
               f"an adaptive threshold is only for TrainConfig.mode 'relift', got "
               f"{self.train.mode!r} (no other mode buffers the hardest questions)")
        if self.sft.demo_source != "teacher":
            return
        _check(self.train.mode == "relift", "SFTConfig", "demo_source", self.sft.demo_source,
               f"teacher demonstrations are only for TrainConfig.mode 'relift', got "
               f"{self.train.mode!r} (the other modes train on the dataset's column)")
        _check(self.teacher.path is not None, "SFTConfig", "demo_source", self.sft.demo_source,
               "needs TeacherConfig.path (a Hugging Face folder; with TeacherConfig.build_gin it "
               "is built when absent)")
