"""Ahead-of-time compilation for a TPU topology, on this CPU: does one ReLIFT iteration fit, and how
long would it take?

  python -m relift_jax.aot --gin_file=gin/experiments/qwen2.5_math_7b_v5p-64.gin --topology=v5p-64 \
    [--gin.RolloutConfig.decode_tensor=4] [--functions=engine_prefill,engine_segment]

Compiles, at the configuration's exact shapes and with the run's own shardings, the programs of one
iteration: the train-state initialisation, the RL step, the SFT step, the dense sampler's prefill
and decode loop (`prefill`, `decode`: the reference sampler on the training mesh), and the rollout
engine's (`relift_jax.engine`, what RL sampling runs): `engine_prefill` (each of the N distinct
prompts once) and `engine_segment` (segment_len decode steps), on the decode layout's mesh
(`rollout.DecodeLayout`: RolloutConfig.decode_tensor = T > 0 is a data x tensor = n/T x T mesh over
the same devices with the weights in the compute dtype split T ways; 0 is the training mesh and
parameters). Nothing is materialised: the inputs are `jax.ShapeDtypeStruct`s with shardings on the
compile-only devices of `jax.experimental.topologies.get_topology_desc` (needs libtpu:
`pip install -e '.[aot]'`). Per program it prints the per-device memory of the compiled executable
against the chip's HBM, FLOPs, HBM bytes and ICI bytes per call counted through every loop's trip
count, the collectives inside the decode loop per decode step, and a roofline estimate of one
iteration (sampling, RL, SFT) from the chip's peak bf16 FLOP/s, HBM bandwidth and ICI bandwidth.

Exit status: 0 when every program fits; 3 when one does not (the compiler's out-of-memory message,
or our own total over the chip's HBM, is printed); 2 for a configuration error.

The model's architecture comes from `<ModelLoadConfig.path>/config.json` when that file exists (no
weights are read), else from `ModelLoadConfig.random_init` (`vocab_size` from the tokenizer only
when random_init lacks it): a gin file can describe a model whose checkpoint is not on this disk.

Where the numbers come from (the report repeats this):
- memory: `compiled.memory_analysis()` of the TPU executable, per device: arguments + outputs -
  aliased (donated) + temporaries. The compiler's own out-of-memory error is reported as such.
- FLOPs and bytes: `compiled.cost_analysis()` counts a while body ONCE, so they are counted here
  from the compiled HLO text (`hlo_cost`): dot/convolution FLOPs and the operand + output bytes of
  every top-level instruction (fusions as one; a dynamic slice counts the slice, an in-place
  dynamic-update-slice or scatter the update), each multiplied by the trip counts of the loops
  around it (known_trip_count when XLA annotates it, else read off the loop condition `i < N` and
  the increment; a decode loop's data-dependent count is an assumption: --decode_steps for the
  dense sampler, segment_len for an engine segment).
- time: max(FLOPs / peak, HBM bytes / HBM bandwidth, ICI bytes / ICI bandwidth) per program: a
  lower bound with perfect overlap at peak; see CHIPS for the chip numbers and their sources.

The engine's sampling estimate (the report prints each step of it):
- schedule: `engine_schedule` replays engine.run's host loop (refills, the window W = power-of-two
  bucket of the longest row + segment_len + 1 capped at the longest prompt + max_response_len + 1
  rounded to 64, the batch bucket shrinking once nothing is pending)
  for one iteration's N x G rows with assumed lengths: prompts of --prompt_len, responses
  --length_dist (default "exponential": the mid-quantiles of an exponential distribution cut at
  max_response_len, its scale solved for the mean --mean_response_len, 3,500 by default, so about
  13% of the 1,024 rows end at the cap 8,192; or "cliff": one row at the cap and the rest at the
  mean). Every segment runs min(segment_len, the longest remaining row) steps.
- compiled segments: at every (B, W) of that schedule (and of the other length distribution's,
  also reported) and at three fit points (two windows at the
  largest batch: the bucket of prompt + mean response and of prompt + max_response_len, and the
  latter at the smallest batch bucket). A segment's cost is split into one decode step (its HLO
  counted at segment_len trips minus at one trip) and the rest of the call.
- cost per step: a compiled (B, W) uses its own counts; any other (the other length distribution,
  other slot counts) uses q = c0 + c1 B + c2 B W fitted by least squares to the compiled segments,
  per quantity (FLOPs, HBM bytes, ICI bytes): c0 ~ the weights a step reads, c1 ~ a row's
  activations and logits, c2 ~ a row's K and V per window slot (and its attention scores).
- time: per segment call max(FLOPs / peak, HBM bytes / bandwidth, ICI bytes / bandwidth) of its
  steps x the per-step cost + the rest; plus the prefill of incoming rows (engine_prefill, scaled in
  its distinct prompts beyond the weights), the insert and every rearrange (2 x the cache bytes
  moved), and with T > 0 the weights' copy into the layout (their bytes per device over the ICI).
  Host work between segments (the tokens' transfer, Python) is not counted.

Shape key: N questions per iteration, G samples per question, B sampler rows (engine: slots), P
padded prompt length, S = P + max new tokens cache slots, W the engine's window, U distinct prompts,
M micro-batches, b rows per micro-batch, T row length (decode_tensor: T of the decode layout).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
import time
import types
from typing import Any, Callable, Sequence

# libtpu is loaded only for its compiler; the default backend stays the CPU. Several processes may
# load libtpu at once (tests beside a run), and there is no TPU host or metadata server to query.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from relift_jax import hlo_cost  # noqa: E402

GiB = 1024 ** 3
EXIT_OOM = 3
# What --functions chooses from: the RL and SFT steps, the dense sampler's prefill and decode loop,
# and the rollout engine's prefill of the distinct prompts and its decode segment.
ENGINE_FUNCTIONS = ("engine_prefill", "engine_segment")
FUNCTIONS = ("rl", "sft", "prefill", "decode") + ENGINE_FUNCTIONS


# ----------------------------------------------------------------------------- chips and topologies

@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-chip numbers used for the fit check and the roofline estimate."""

    kind: str
    hbm_bytes: float       # HBM capacity
    peak_flops: float      # dense bf16 FLOP/s
    hbm_bw: float          # HBM bytes/s
    ici_bw: float          # bidirectional ICI bytes/s over all the chip's links
    cores_per_chip: int    # TensorCores per chip ("v5p-64" counts cores)
    source: str


# Google Cloud TPU documentation ("System architecture" tables of the v4, v5p, v5e, v6e pages);
# v4's ICI figure is not in its page: 6 links x 2 directions x 45 GB/s (the JAX scaling book).
CHIPS = {
    "v4": Chip("v4", 32 * GiB, 275e12, 1200e9, 540e9, 2,
               "cloud.google.com/tpu/docs/v4; ICI: jax-ml.github.io/scaling-book (6 x 90 GB/s)"),
    "v5p": Chip("v5p", 95 * GiB, 459e12, 2765e9, 1200e9, 2, "cloud.google.com/tpu/docs/v5p"),
    "v5e": Chip("v5e", 16 * GiB, 197e12, 819e9, 400e9, 1, "cloud.google.com/tpu/docs/v5e"),
    "v6e": Chip("v6e", 32 * GiB, 918e12, 1638e9, 800e9, 1, "cloud.google.com/tpu/docs/v6e"),
}

# Slice shapes by chip count (Cloud TPU docs; the ones libtpu's compile-only topologies accept).
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
              256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v4p": "v4"}


@dataclasses.dataclass(frozen=True)
class Topology:
    chip: Chip
    name: str        # what libtpu takes, e.g. "v5p:2x4x4"
    num_chips: int


def parse_topology(name: str) -> Topology:
    """`v5p-64` (Cloud TPU accelerator type: cores for v4/v5p, chips for v5e/v6e) or `v5p:2x4x4`."""
    m = re.fullmatch(r"([a-z0-9]+?)(?:-(\d+)|:(\d+(?:x\d+)+))", name.strip().lower())
    kind = _ALIASES.get(m.group(1), m.group(1)) if m else None
    if not m or kind not in CHIPS:
        raise ValueError(f"topology {name!r}: expected TYPE-SIZE (v4-64, v5p-64, v5e-16, v6e-64) "
                         f"or TYPE:AxBxC (v5p:2x4x4), TYPE one of {sorted(CHIPS)}")
    chip = CHIPS[kind]
    if m.group(3):
        dims = [int(d) for d in m.group(3).split("x")]
        return Topology(chip, f"{kind}:{m.group(3)}", int(np.prod(dims)))
    size = int(m.group(2))
    chips = size // chip.cores_per_chip
    table = _SHAPES_3D if chip.cores_per_chip == 2 else _SHAPES_2D
    if size % chip.cores_per_chip or chips not in table:
        unit = "TensorCores (2 per chip)" if chip.cores_per_chip == 2 else "chips"
        sizes = ", ".join(f"{kind}-{n * chip.cores_per_chip}" for n in table)
        raise ValueError(f"topology {name!r}: {kind}-N counts {unit}; known sizes: {sizes}")
    return Topology(chip, f"{kind}:{table[chips]}", chips)


def topology_devices(topo: Topology) -> list:
    """Compile-only TPU devices of the topology (one per chip: v4 is asked for megacore)."""
    from jax.experimental import topologies

    from relift_jax.config import ConfigError
    if not libtpu_available():
        raise ConfigError("libtpu is not installed, and only it compiles for TPUs: "
                          "pip install -e '.[aot]'")
    kw = {"chip_config_name": "megacore"} if topo.chip.kind == "v4" else {}
    devices = topologies.get_topology_desc(platform="tpu", topology_name=topo.name, **kw).devices
    if len(devices) != topo.num_chips:
        raise RuntimeError(f"libtpu made {len(devices)} devices for {topo.name}, expected "
                           f"{topo.num_chips}")
    return list(devices)


def libtpu_available() -> bool:
    try:
        import libtpu  # noqa: F401
        return True
    except ImportError:
        return False


# ----------------------------------------------------------------------------- configs and model

@dataclasses.dataclass(frozen=True)
class Configs:
    """The parts of a RunConfig that shape an iteration (no data, no run directory)."""

    model: Any
    train: Any
    rollout: Any
    rl: Any
    sft: Any
    mesh: Any

    def as_run_config(self):
        from relift_jax.config import DataConfig, RunConfig
        return RunConfig(model=self.model, data=DataConfig(train="(aot: no data)"), train=self.train,
                         rollout=self.rollout, rl=self.rl, sft=self.sft, mesh=self.mesh)


def load_configs(gin_files: Sequence[str], bindings: Sequence[str] = (),
                 search_paths: Sequence[str] = ()) -> Configs:
    """The gin files' configs, as `python -m relift_jax.main` builds them (DataConfig and the run
    directory are not needed, so a recipe's %gin.REQUIRED data and RUN_DIR may stay unbound)."""
    import gin

    from relift_jax import main
    from relift_jax.config import ModelLoadConfig, RLConfig, RolloutConfig, SFTConfig, TrainConfig
    from relift_jax.sharding import MeshConfig
    try:
        main.parse_gin(gin_files, bindings, search_paths)
        return Configs(model=main.configured(ModelLoadConfig), train=main.configured(TrainConfig),
                       rollout=main.configured(RolloutConfig), rl=main.configured(RLConfig),
                       sft=main.configured(SFTConfig), mesh=main.configured(MeshConfig))
    finally:
        gin.clear_config()


def model_config(m) -> Any:
    """ModelConfig from `<path>/config.json` when that exists (as a run would load it), else from
    `random_init` (as build.load_model makes a fresh model).

    Every ModelLoadConfig field that ModelConfig also has (dtypes, remat, attention, ...) is
    passed on, as load_model does.
    """
    from relift_jax import hf, model
    from relift_jax.config import ConfigError
    shared = {f.name for f in dataclasses.fields(model.ModelConfig)} & \
        {f.name for f in dataclasses.fields(m)}
    numerics = {k: getattr(m, k) for k in shared}
    if m.path and os.path.exists(os.path.join(m.path, "config.json")):
        cfg = hf.config_from_hf(hf.load_hf_config(m.path), source=m.path,
                                param_dtype=m.param_dtype, compute_dtype=m.compute_dtype)
        return cfg.replace(**numerics)
    if m.random_init:
        fields = {"model_type": "qwen2", "qkv_bias": True, **m.random_init}
        if "vocab_size" not in fields:
            fields["vocab_size"] = _vocab_size(m.tokenizer_path or m.path)
        return model.ModelConfig(**{**fields, **numerics})
    raise ConfigError(f"ModelLoadConfig.path = {m.path!r} has no config.json and random_init is "
                      f"not set: the AOT tool needs the architecture (set random_init, with "
                      f"vocab_size, or point path at a folder with config.json)")


def _vocab_size(tok_path: str | None) -> int:
    from relift_jax import hf
    from relift_jax.config import ConfigError
    if tok_path == "toy":
        from relift_jax.toy.tokenizer import TOKENIZER_DIR
        tok_path = str(TOKENIZER_DIR)
    if not tok_path or not os.path.isdir(tok_path):
        raise ConfigError(f"ModelLoadConfig.random_init has no vocab_size and the tokenizer "
                          f"folder {tok_path!r} does not exist: give random_init a vocab_size")
    return len(hf.load_tokenizer(tok_path))


# ----------------------------------------------------------------------------- assumptions

@dataclasses.dataclass(frozen=True)
class Assumptions:
    """What the compiled shapes and the time estimate cannot know from the config alone."""

    prompt_len: int          # every prompt this long (default: max_prompt_len, the worst case)
    mean_response_len: int   # rollouts' and demonstrations' mean length (the paper: ~3,500)
    decode_steps: int        # decode-loop trips (it stops when every row is done)
    sft_fraction: float      # share of iterations in which the SFT step fires
    length_dist: str = "exponential"  # rollout lengths for the engine's schedule (LENGTH_DISTS)

    def lines(self, c: Configs) -> list[str]:
        ro = c.rollout
        return [
            f"prompts: all {self.prompt_len} tokens (max_prompt_len {ro.max_prompt_len})",
            f"responses and demonstrations: mean {self.mean_response_len} tokens, and in every "
            f"batch one at the cap {ro.max_response_len} (the longest sequence, "
            f"{self.prompt_len + ro.max_response_len} tokens, sets the row length)",
            f"dense decode loop: {self.decode_steps} steps (it runs until all "
            f"{ro.questions_per_iteration * ro.group_size} rows stop; one uncapped row keeps it "
            f"going to max_response_len)",
            f"rollout engine's schedule: the {ro.questions_per_iteration * ro.group_size} "
            f"rollouts' lengths "
            f"{_dist_words(self.length_dist, self.mean_response_len, ro.max_response_len)}; "
            f"segments of {ro.segment_len} steps, "
            f"{ro.decode_slots or 'all'} slots; host work between segments (token transfer, "
            f"Python) not counted",
            f"RL: {c.rl.num_mini_batches} updates per iteration (num_mini_batches) over "
            f"{ro.questions_per_iteration} x {ro.group_size} rollouts",
            f"SFT: {c.sft.steps_per_trigger} step(s) per firing on {_sft_rows(c)} demonstrations; "
            f"it fires in {self.sft_fraction:.0%} of iterations (the paper: ~8K demonstrations "
            f"used / 128 per step over ~1,080 iterations)",
        ]


def default_assumptions(c: Configs, **over) -> Assumptions:
    ro = c.rollout
    a = Assumptions(prompt_len=ro.max_prompt_len,
                    mean_response_len=min(3500, ro.max_response_len),
                    decode_steps=ro.max_response_len, sft_fraction=0.06)
    return dataclasses.replace(a, **{k: v for k, v in over.items() if v is not None})


def _dist_words(dist: str, mean: int, cap: int) -> str:
    if dist == "cliff":
        return f"one at the cap {cap}, the rest at the mean {mean} (as the RL batch assumes)"
    return (f"exponential with mean {mean} cut at the cap {cap} (the cut rows at the cap; scale "
            f"solved for the mean; mid-quantiles, so deterministic)")


def _sft_rows(c: Configs) -> int:
    if c.train.mode in ("sft", "sft_then_rl"):
        return c.sft.sft_questions_per_step or c.sft.buffer_size
    return c.sft.buffer_size


def _lengths(n: int, mean: int, cap: int) -> list[int]:
    """n lengths with the given mean, one of them at the cap (so the batch's padded length is the
    worst case)."""
    if n == 1:
        return [cap]
    rest = max(1, round((mean * n - cap) / (n - 1)))
    return [cap] + [min(rest, cap)] * (n - 1)


# ----------------------------------------------------------------------------- abstract inputs

def _abstract(x, sharding_) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype if not hasattr(x, "dtype")
                                else x.dtype, sharding=sharding_)


def abstract_batch(batch, mesh):
    """A host batch as ShapeDtypeStructs placed as `batches.device_batch` places it: rows (axis 1
    of [M, b, ...]) over the batch axes, scalars replicated."""
    from jax.sharding import NamedSharding, PartitionSpec

    from relift_jax import sharding

    def place(x):
        x = np.asarray(x)
        if x.ndim < 2:
            return _abstract(x, NamedSharding(mesh, PartitionSpec()))
        spec = sharding.logical_to_spec((None, "batch") + (None,) * (x.ndim - 2))
        return _abstract(x, NamedSharding(mesh, spec))
    return jax.tree.map(place, batch)


def fake_rl_batch(c: Configs, packing, a: Assumptions):
    """The first (largest) of the iteration's RL mini-batches, packed by the project's
    `pack_rl_batch` from stand-in rollouts of the assumed lengths."""
    from relift_jax import batches
    ro = c.rollout
    rows = math.ceil(ro.questions_per_iteration * ro.group_size / c.rl.num_mini_batches)
    lens = _lengths(rows, a.mean_response_len, ro.max_response_len)
    prompts = [[1] * a.prompt_len] * rows
    responses = [[1] * n for n in lens]
    batch = batches.pack_rl_batch(prompts, responses, [[0.0] * n for n in lens],
                                  np.zeros(rows, np.float32), packing)
    if c.rl.kl_coef > 0:
        batch = batches.with_ref_logprobs(batch, np.zeros(batch.micro_batches.tokens_bxT.shape,
                                                          np.float32))
    if c.train.mode == "rl_with_sft_loss":
        batch = batches.attach_sft(batch, fake_sft_batch(c, packing, a, ro.questions_per_iteration))
    return batch


def fake_sft_batch(c: Configs, packing, a: Assumptions, rows: int | None = None):
    """One SFT batch as the controller packs it (the RL packing with SFTConfig's micro-batch
    settings) from stand-in demonstrations of the assumed lengths."""
    from relift_jax import batches
    rows = rows or _sft_rows(c)
    cap = c.sft.max_demo_len or c.rollout.max_response_len
    pk = dataclasses.replace(packing, micro_batch_size=c.sft.micro_batch_size,
                             tokens_per_micro_batch=c.sft.tokens_per_micro_batch)
    lens = _lengths(rows, min(a.mean_response_len, cap), cap)
    return batches.pack_sft_batch([[1] * a.prompt_len] * rows, [[1] * n for n in lens], pk)


def state_shardings(shapes, params, txs: dict, share_optimizer: bool):
    """Where the run's init puts the train state: params as given, the optimiser states by
    `train_step.opt_shardings` (which takes ShapeDtypeStructs), the step counters replicated."""
    from relift_jax import train_step
    rep = jax.sharding.NamedSharding(jax.tree.leaves(params)[0].sharding.mesh,
                                     jax.sharding.PartitionSpec())
    opt = train_step.opt_shardings(params, txs["rl"], txs["sft"], share_optimizer)
    rl_sh, sft_sh = opt if opt is not None else (jax.tree.map(lambda _: rep, shapes.rl_opt),
                                                 jax.tree.map(lambda _: rep, shapes.sft_opt))
    return shapes.replace(params=jax.tree.map(lambda x: x.sharding, params), rl_opt=rl_sh,
                          sft_opt=sft_sh, rl_steps=rep, sft_steps=rep)


def replicated_moment_bytes(state) -> float:
    """Per-device bytes of optimiser-state arrays that are replicated although shaped like a
    sharded parameter."""
    sharded = {tuple(x.shape) for x in jax.tree.leaves(state.params)
               if not x.sharding.is_fully_replicated}
    total = 0.0
    for x in jax.tree.leaves((state.rl_opt, state.sft_opt)):
        if tuple(x.shape) in sharded and x.sharding.is_fully_replicated:
            total += np.prod(x.shape) * np.dtype(x.dtype).itemsize
    return total


def _jitted(step: Callable) -> Any:
    """The jitted function inside a `build.Steps` entry (a closure `lambda s, b: jit(s, put(b))`)."""
    for cell in getattr(step, "__closure__", None) or ():
        fn = cell.cell_contents
        if hasattr(fn, "lower"):
            return fn
    raise RuntimeError("build.make_steps no longer wraps a jitted step in its Steps closures: "
                       "relift_jax.aot needs the jitted RL and SFT steps")


# ----------------------------------------------------------------------------- compiling

@dataclasses.dataclass
class Program:
    """One compiled (or failed) program and what was measured of it."""

    name: str
    compile_s: float = 0.0
    memory: Any = None              # CompiledMemoryStats
    cost: hlo_cost.Cost | None = None
    xla_cost: dict | None = None    # compiled.cost_analysis(): loop bodies counted once
    error: str | None = None        # the compiler's message (out of memory or other)
    oom: bool = False
    hlo: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    engine: Any = None              # EngineInfo of an engine program
    segment: Any = None             # SegmentShape of an engine segment

    @property
    def peak_bytes(self) -> float | None:
        m = self.memory
        if m is None:
            return None
        return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                + m.temp_size_in_bytes)


def _compile(name: str, lower: Callable[[], Any], keep_hlo: bool = False,
             unknown_trips: int | None = None) -> tuple[Program, Any]:
    """Lower and compile; an out-of-memory failure is recorded, not raised."""
    p = Program(name)
    t0 = time.perf_counter()
    lowered = compiled = None
    try:
        lowered = lower()
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001: the compiler's errors are reported, whatever their type
        msg = str(e)
        p.oom = "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower()
        p.error = msg.strip()
        if not p.oom:
            raise
    p.compile_s = time.perf_counter() - t0
    if compiled is not None:
        p.memory = compiled.memory_analysis()
        text = compiled.as_text()
        p.cost = hlo_cost.analyse(text, unknown_trips=unknown_trips)
        xc = compiled.cost_analysis()
        p.xla_cost = xc[0] if isinstance(xc, (list, tuple)) else xc
        p.hlo = text if keep_hlo else None
    return p, (lowered, compiled)


def _out_abstract(lowered, compiled):
    """The outputs as ShapeDtypeStructs with the compiled program's shardings."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        lowered.out_info, compiled.output_shardings)


def compile_iteration(c: Configs, cfg, mesh, a: Assumptions, *,
                      functions: Sequence[str] = FUNCTIONS,
                      keep_hlo: bool = False, log: Callable[[str], None] = print) -> list[Program]:
    """Compiles the iteration's programs on `mesh` (a mesh of compile-only TPU devices): the train
    state's init always, then the chosen ones of FUNCTIONS (rl, sft, the dense sampler's prefill
    and decode, the engine's engine_prefill and engine_segment)."""
    from relift_jax import build, model
    programs: list[Program] = []

    def done(p: Program) -> None:
        status = "OUT OF MEMORY" if p.oom else f"{_mem(p.peak_bytes)} per device"
        log(f"  compiled {p.name:<8} in {p.compile_s:6.1f} s: {status}")
        for note in p.notes:
            log(f"    note: {note}")
        programs.append(p)

    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          model.param_shapes(cfg), build.param_shardings_for(mesh)(cfg))
    run_cfg = c.as_run_config()
    # The train state as the run's init (build.train_state) makes it: its shapes by tracing it, its
    # shardings as the init pins them. Outside the mesh context: optax's eager bits run on the host.
    txs: dict = {}

    def init(q):
        st, txs["rl"], txs["sft"] = build.train_state(run_cfg, q)
        return st
    shapes = jax.eval_shape(init, params)
    state_sh = state_shardings(shapes, params, txs, run_cfg.sft.share_optimizer)
    state = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                         shapes, state_sh)
    with jax.set_mesh(mesh):
        p, _ = _compile("init", lambda: jax.jit(init, donate_argnums=0,
                                                out_shardings=state_sh).lower(params), keep_hlo)
        rep = replicated_moment_bytes(state)
        if rep:
            p.notes.append(f"{rep / GiB:.2f} GiB per device of optimiser state is replicated on "
                           f"every device although its parameters are sharded")
        done(p)
        if {"rl", "sft"} & set(functions):
            _train_steps(c, cfg, run_cfg, state, txs, mesh, a, functions, keep_hlo, done)
        if {"prefill", "decode"} & set(functions):
            _sampler(c, cfg, params, mesh, a, functions, keep_hlo, done)
        if set(ENGINE_FUNCTIONS) & set(functions):
            _engine(c, cfg, params, mesh, a, functions, keep_hlo, done)
    return programs


def _train_steps(c: Configs, cfg, run_cfg, state, txs: dict, mesh, a: Assumptions,
                 functions: Sequence[str], keep_hlo: bool, done: Callable) -> None:
    """The RL and SFT steps as build.make_steps jits them, on batches packed as the controller
    packs them."""
    from relift_jax import build
    # make_steps reads only pad_token_id of the tokenizer (the padding value, not a shape)
    steps = build.make_steps(run_cfg, cfg, state, txs["rl"], txs["sft"],
                             types.SimpleNamespace(pad_token_id=0), mesh)
    if "rl" in functions:
        batch = abstract_batch(fake_rl_batch(c, steps.packing, a), mesh)
        done(_compile("rl_step", lambda: _jitted(steps.rl).lower(state, batch), keep_hlo)[0])
    if "sft" in functions:
        batch = abstract_batch(fake_sft_batch(c, steps.packing, a), mesh)
        done(_compile("sft_step", lambda: _jitted(steps.sft).lower(state, batch), keep_hlo)[0])


# The KV cache's logical axes (sampler._prefill constrains it so), for when the prefill does not
# compile and the decode loop still should.
_CACHE_AXES = ("cache_layers", "batch", "cache_kv_heads", "cache_slots", None)


def _sampler(c: Configs, cfg, params, mesh, a: Assumptions, functions: Sequence[str],
             keep_hlo: bool, done: Callable) -> None:
    """The sampler's prefill and decode loop at `sampler.sample`'s shapes for one iteration's
    N x G rows, with the rollout's sampling settings."""
    from relift_jax import sampler, sharding
    ro = c.rollout
    B = sampler._batch_bucket(ro.questions_per_iteration * ro.group_size,
                              sharding.batch_divisor(mesh))
    P = sampler.bucket(a.prompt_len)
    S = P + ro.max_response_len

    def rows(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
    tokens_BxP, pad_B, done_B = rows((B, P), np.int32), rows((B,), np.int32), rows((B,), np.bool_)
    p, (lowered, compiled) = _compile(
        "prefill", lambda: sampler._prefill.lower(cfg, params, tokens_BxP, pad_B, S), keep_hlo)
    if "prefill" in functions:
        done(p)
    if "decode" not in functions:
        return
    if compiled is not None:
        cache, logits_BxV = _out_abstract(lowered, compiled)
    else:
        cache_info, logits_info = lowered.out_info
        cache = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.named_sharding(
            mesh, _CACHE_AXES, v.shape)) for k, v in cache_info.items()}
        logits_BxV = rows(logits_info.shape, logits_info.dtype)
    # Stop ids change no shape, only their count does: EOS and end of turn, as for Qwen.
    sp = sampler.SamplingParams(max_new_tokens=ro.max_response_len, temperature=ro.temperature,
                                top_p=ro.top_p, top_k=ro.top_k,
                                stop_ids=(cfg.vocab_size - 1, cfg.vocab_size - 2))
    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                               sharding=jax.sharding.NamedSharding(mesh,
                                                                   jax.sharding.PartitionSpec()))
    done(_compile("decode", lambda: sampler._decode.lower(cfg, sp, params, cache, logits_BxV,
                                                          pad_B, done_B, key),
                  keep_hlo, unknown_trips=a.decode_steps)[0])


# ----------------------------------------------------------------------------- the rollout engine

@dataclasses.dataclass(frozen=True)
class StepCost:
    """Per-device FLOPs, HBM bytes and ICI bytes (received) of a piece of work."""

    flops: float = 0.0
    bytes: float = 0.0
    ici: float = 0.0

    def __add__(self, o: "StepCost") -> "StepCost":
        return StepCost(self.flops + o.flops, self.bytes + o.bytes, self.ici + o.ici)

    def __sub__(self, o: "StepCost") -> "StepCost":
        return StepCost(self.flops - o.flops, self.bytes - o.bytes, self.ici - o.ici)

    def __mul__(self, k: float) -> "StepCost":
        return StepCost(k * self.flops, k * self.bytes, k * self.ici)

    __rmul__ = __mul__

    def roofline(self, chip: "Chip") -> "Roofline":
        return Roofline(self.flops / chip.peak_flops, self.bytes / chip.hbm_bw,
                        self.ici / (chip.ici_bw / 2))


def _step_cost(cost: hlo_cost.Cost) -> StepCost:
    return StepCost(cost.flops, cost.bytes, cost.ici_bytes)


@dataclasses.dataclass
class SegmentShape:
    """A compiled engine segment's shape and its cost split into one decode step and the rest."""

    batch: int                 # B slots (global)
    window: int                # W cache slots
    steps: int                 # the loop's trips per call (segment_len)
    per_step: StepCost         # one trip of the decode loop, per device
    outside: StepCost          # the rest of one call (before and after the loop), per device
    loop_collectives: list = dataclasses.field(default_factory=list)  # per decode step
    weight_gathers: list = dataclasses.field(default_factory=list)    # those that gather weights
    kernels: float = 0.0       # Pallas TPU kernel calls per decode step (the ragged attention)


@dataclasses.dataclass(frozen=True)
class EngineShapes:
    """The shapes of the engine's programs for one iteration, as engine.run chooses them."""

    rows: int          # N x G rows of one iteration
    multiple: int      # the decode mesh's batch divisor
    max_slots: int     # B while rows are pending (decode_slots or all rows, to the divisor)
    min_slots: int     # the smallest batch bucket (the last rows)
    distinct: int      # U distinct prompts of the first prefill (bucketed as engine._start_rows)
    prompt_bucket: int
    segment_len: int
    windows: tuple     # (W at prompt + mean response, W at prompt + max_response_len)

    @property
    def fit_points(self) -> list[tuple[int, int]]:
        """(B, W) that pin the cost model: two windows at B = max_slots (its slope in W) and the
        largest window at the smallest batch (its slope in B). With the tiny window of a toy
        config the two windows may coincide (then the model has no slope in W)."""
        lo, hi = self.windows
        return list(dict.fromkeys([(self.max_slots, lo), (self.max_slots, hi),
                                   (self.min_slots, hi)]))


@dataclasses.dataclass(frozen=True)
class EngineInfo:
    """Where the engine's programs ran: the decode layout and what a device holds there."""

    mesh_shape: dict           # the decode layout's mesh
    tensor: int                # RolloutConfig.decode_tensor
    dtype: str                 # the weights' dtype there
    weight_bytes: float        # the weights on one device
    weight_read_bytes: float   # the weights a decode step reads on one device (gathered or not)
    cache_slot_bytes: float    # a device's cache bytes per (row, slot) of the global cache
    shapes: EngineShapes
    schedule: tuple            # the Segments of the assumed lengths (Assumptions.length_dist)
    ragged_block: int = 0      # the ragged decode kernel's key block (0: dense decode attention)
    layers: int = 0            # the model's layers


def _ragged_block(c: Configs) -> int:
    """The ragged decode kernel's key block (ModelConfig's default), 0 with dense decoding."""
    from relift_jax.model import ModelConfig
    return ModelConfig.decode_attention_block if c.rollout.decode_attention == "ragged" else 0


def engine_shapes(c: Configs, a: Assumptions, multiple: int) -> EngineShapes:
    from relift_jax import engine
    ro = c.rollout
    n = ro.questions_per_iteration * ro.group_size
    max_slots = -(-(ro.decode_slots or n) // multiple) * multiple
    seg = ro.segment_len
    cap = engine.window_cap(a.prompt_len, ro.max_response_len, _ragged_block(c) or 64)
    floor = engine._bucket(a.prompt_len, 16)
    hi = max(min(engine._bucket(a.prompt_len + ro.max_response_len + seg + 1, 64), cap), floor)
    lo = max(min(engine._bucket(a.prompt_len + a.mean_response_len + seg + 1, 64), cap), floor)
    if lo >= hi:  # a toy config: the next smaller power of two, if the prompts fit in it
        below = engine._bucket(hi, 64) // 2
        lo = below if below >= max(64, floor) else hi
    first = min(ro.questions_per_iteration, -(-max_slots // ro.group_size))
    return EngineShapes(
        rows=n, multiple=multiple, max_slots=max_slots,
        min_slots=engine._batch_size(1, max_slots, multiple),
        distinct=-(-engine._bucket(first, 1) // multiple) * multiple,
        prompt_bucket=engine._bucket(a.prompt_len, 16), segment_len=seg, windows=(lo, hi))


def iteration_schedule(c: Configs, a: Assumptions, multiple: int, dist: str | None = None
                       ) -> list["Segment"]:
    """engine.run's segments for one iteration's N x G rows at the assumed lengths."""
    ro = c.rollout
    n = ro.questions_per_iteration * ro.group_size
    lens = response_lengths(n, a.mean_response_len, ro.max_response_len, dist or a.length_dist)
    return engine_schedule([a.prompt_len] * ro.questions_per_iteration, lens, ro.group_size,
                           slots=ro.decode_slots, multiple=multiple, segment_len=ro.segment_len,
                           max_new_tokens=ro.max_response_len, ragged_block=_ragged_block(c))


def _engine(c: Configs, cfg, train_params, train_mesh, a: Assumptions,
            functions: Sequence[str], keep_hlo: bool, done: Callable) -> None:
    """The rollout engine's prefill of the distinct prompts and its decode segments, on the decode
    layout's mesh with the parameters in the layout's shardings and dtype (rollout.DecodeLayout;
    RolloutConfig.decode_tensor = 0 is the training mesh and parameters as they are). Segments are
    compiled at the cost model's fit points and at every (B, W) of the iteration's schedule (for
    both length distributions)."""
    from relift_jax import engine, model, sampler, sharding
    from relift_jax.rollout import DecodeLayout
    ro = c.rollout
    layout = DecodeLayout(cfg, train_mesh, ro.decode_tensor, ro.decode_attention)
    cfg, mesh = layout.cfg, layout.mesh
    if layout.shardings is not None:
        params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, cfg.dtype, sharding=sh),
                              model.param_shapes(cfg), layout.shardings)
    else:
        params = train_params
    multiple = sharding.batch_divisor(mesh)
    g = engine_shapes(c, a, multiple)
    schedule = iteration_schedule(c, a, multiple)
    B, W = g.fit_points[0]
    kv_shape = (cfg.num_layers, B, cfg.num_kv_heads, W, cfg.head_dim)
    kv_shard = sharding.named_sharding(mesh, engine.CACHE_AXES, kv_shape).shard_shape(kv_shape)
    info = EngineInfo(
        mesh_shape=dict(zip(mesh.axis_names, mesh.axis_sizes)), tensor=ro.decode_tensor,
        dtype=str(np.dtype(jax.tree.leaves(params)[0].dtype)),
        weight_bytes=float(sum(np.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                               for x in jax.tree.leaves(params))),
        # A step reads every weight but the input embedding (gathered: one row per token) unless
        # the LM head is that same table.
        weight_read_bytes=(cfg.num_params() - (0 if cfg.tie_word_embeddings else
                                               cfg.vocab_size * cfg.hidden_size))
        * np.dtype(cfg.dtype).itemsize
        / dict(zip(mesh.axis_names, mesh.axis_sizes)).get("tensor", 1),
        cache_slot_bytes=2 * float(np.prod(kv_shard)) * np.dtype(cfg.dtype).itemsize / (B * W),
        shapes=g, schedule=tuple(schedule), ragged_block=_ragged_block(c), layers=cfg.num_layers)

    def rows(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype,
                                    sharding=sharding.batch_sharding(mesh, len(shape), shape))
    with jax.set_mesh(mesh):
        if "engine_prefill" in functions:
            U, Pb = g.distinct, g.prompt_bucket
            tokens_UxP, len_U = rows((U, Pb), np.int32), rows((U,), np.int32)
            p, _ = _compile("engine_prefill", lambda: engine._prefill_prompts.lower(
                cfg, params, tokens_UxP, len_U), keep_hlo)
            p.notes.append(f"{U} distinct prompts of {Pb} slots (prefix sharing: each question "
                           f"once, not x {ro.group_size})")
            p.engine = info
            done(p)
        if "engine_segment" not in functions:
            return
        sp = sampler.SamplingParams(max_new_tokens=ro.max_response_len,
                                    temperature=ro.temperature, top_p=ro.top_p, top_k=ro.top_k,
                                    stop_ids=(cfg.vocab_size - 1, cfg.vocab_size - 2))
        key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                                   sharding=jax.sharding.NamedSharding(
                                       mesh, jax.sharding.PartitionSpec()))
        weights = _weight_shards(cfg, params)
        other = [d for d in LENGTH_DISTS if d != a.length_dist][0]  # also reported
        points = set(g.fit_points) | {(s.batch, s.window) for s in schedule} | {
            (s.batch, s.window) for s in iteration_schedule(c, a, multiple, other)}
        noted = False
        for B, W in sorted(points, key=lambda bw: (-bw[0], bw[1])):
            shape = (cfg.num_layers, B, cfg.num_kv_heads, W, cfg.head_dim)
            kv = jax.ShapeDtypeStruct(shape, cfg.dtype, sharding=sharding.named_sharding(
                mesh, engine.CACHE_AXES, shape))
            logits = jax.ShapeDtypeStruct((B, cfg.vocab_size), np.float32,
                                          sharding=sharding.named_sharding(
                                              mesh, engine.LOGITS_AXES, (B, cfg.vocab_size)))
            state = ({"k": kv, "v": kv}, logits,
                     rows((B,), np.int32), rows((B,), np.int32), rows((B,), np.int32),
                     rows((B,), np.bool_))
            p, (_, compiled) = _compile(
                f"segment_b{B}_w{W}",
                lambda: engine._segment.lower(cfg, sp, g.segment_len, params, state, key),
                keep_hlo, unknown_trips=g.segment_len)
            p.engine = info
            if p.cost is not None:
                p.segment = _segment_shape(p.cost, compiled.as_text(), B, W, g.segment_len,
                                           weights)
                names = ["cache k", "cache v", "logits", "len", "gen", "row", "done"]
                moved = [name for name, x, o in zip(names, jax.tree.leaves(state),
                                                    jax.tree.leaves(compiled.output_shardings[0]))
                         if not x.sharding.is_equivalent_to(o, len(x.shape))]
                if moved and not noted:  # said once: every segment shares the cause
                    noted = True
                    p.notes.append(f"the state's {', '.join(moved)} come(s) out in another "
                                   f"sharding than it went in: in a run the next segment "
                                   f"compiles once more for it (not donated in place)")
            done(p)


def _weight_shards(cfg, params) -> set[int]:
    """Element counts of a device's shard of every weight matrix (and of one layer of it): what
    the operand of an all-gather that gathers a weight holds. Biases and norms are left out (too
    small to matter, and a per-row vector could match them)."""
    sizes = set()
    for x in jax.tree.leaves(params):
        stacked = len(x.shape) > 2 and x.shape[0] == cfg.num_layers
        if len(x.shape) - stacked < 2:
            continue
        n = int(np.prod(x.sharding.shard_shape(x.shape)))
        sizes.add(n)
        if stacked:
            sizes.add(n // cfg.num_layers)
    return sizes


def _segment_shape(cost: hlo_cost.Cost, text: str, B: int, W: int, steps: int,
                   weights: set[int]) -> SegmentShape:
    """The decode loop's cost per trip: the program counted at `steps` trips minus at one trip.
    A weight all-gather: a float operand of exactly a weight matrix's shard (or one layer's)."""
    full = _step_cost(cost)
    if cost.unknown_loop is None:  # no data-dependent loop found: all of it as the steps' cost
        return SegmentShape(B, W, steps, full * (1.0 / steps), StepCost())
    once = hlo_cost.analyse(text, unknown_trips=1)
    one = _step_cost(once)
    per_step = (full - one) * (1.0 / (steps - 1)) if steps > 1 else one
    kernels = (cost.kernel_calls - once.kernel_calls) / (steps - 1) if steps > 1 else \
        once.kernel_calls
    cols = cost.collectives_in(cost.unknown_loop, per_trip=True)
    gathers = []
    for col in cols:
        operand = hlo_cost.shape_dims(col.shape)
        n = int(np.prod(operand)) if operand else 0
        if col.op == "all-gather" and col.count and col.shape.startswith(("bf16", "f32", "f16")) \
                and n in weights:
            gathers.append(col)
    return SegmentShape(B, W, steps, per_step, one - per_step, cols, gathers, kernels)


# ----------------------------------------------------------------------------- engine schedule

@dataclasses.dataclass(frozen=True)
class Segment:
    """One `engine._segment` call of engine.run's loop."""

    batch: int        # B slots
    window: int       # W cache slots
    live: int         # rows decoding in it (after the refill)
    steps: int        # decode steps it runs (segment_len, fewer when every row ends sooner)
    incoming: int     # rows started before it (prefill + insert)
    distinct: int     # distinct prompts prefilled for them
    rearranged: bool  # the state was compacted / resized before it
    # With the ragged decode kernel (ragged_block > 0): the key slots it reads per decode step,
    # summed over the batch's rows and averaged over the steps (each row's filled slots rounded
    # up to the block; a finished or empty row still reads its blocks, at least one). 0: dense.
    read_slots: float = 0.0


def engine_schedule(prompt_lens: Sequence[int], response_lens: Sequence[int], num_samples: int,
                    *, slots: int = 0, multiple: int = 1, segment_len: int = 32,
                    max_new_tokens: int | None = None, ragged_block: int = 0) -> list[Segment]:
    """The segments engine.run makes for rows of these lengths (row i continues prompt
    i // num_samples and makes response_lens[i] tokens, its stop token included), by the same
    refill, window and batch rules (engine._bucket, engine._batch_size; the window capped at the
    longest prompt + max_new_tokens + 1, rounded up to 64, or to ragged_block with the ragged
    decode kernel, whose reads each Segment then counts; default max_new_tokens: the longest
    response)."""
    from relift_jax import attention, engine
    n = len(response_lens)
    max_slots = -(-(slots or n) // multiple) * multiple
    max_new = max_new_tokens if max_new_tokens is not None else max(response_lens)
    window_cap = engine.window_cap(max(prompt_lens), max_new, ragged_block or 64)
    pending = list(range(n))[::-1]
    slot_row: list[int] = []
    slot_len: list[int] = []
    slot_left: list[int] = []
    window, batch, shape = 0, max_slots, None
    out = []
    while True:
        live = [j for j, r in enumerate(slot_row) if r >= 0]
        take = min(len(pending), max_slots - len(live))
        incoming = [pending.pop() for _ in range(take)]
        if not live and not incoming:
            return out
        distinct = sorted({r // num_samples for r in incoming})
        longest = max([slot_len[j] for j in live] + [prompt_lens[u] for u in distinct])
        window = max(window, min(engine._bucket(longest + segment_len + 1, 64), window_cap),
                     engine._bucket(max([prompt_lens[u] for u in distinct], default=1), 16))
        batch = min(batch, engine._batch_size(len(live) + len(incoming), max_slots, multiple))
        moved = shape is not None and ((batch, window) != shape or live != list(range(len(live))))
        shape = (batch, window)
        pad = [0] * (batch - len(live))
        slot_row = [slot_row[j] for j in live] + [-1] * len(pad)
        slot_len = [slot_len[j] for j in live] + pad
        slot_left = [slot_left[j] for j in live] + pad
        for j, r in enumerate(incoming, start=len(live)):
            slot_row[j], slot_len[j] = r, prompt_lens[r // num_samples]
            slot_left[j] = max(1, response_lens[r])
        steps = min(segment_len, max(slot_left[j] for j, r in enumerate(slot_row) if r >= 0))
        read = 0.0
        if ragged_block:  # row j reads its slots 0..len (len grows while it is live) in blocks
            blk = attention._decode_block(window, ragged_block)
            len0 = np.array(slot_len, np.int64)
            grow = np.array([min(steps, slot_left[j]) if r >= 0 else 0
                             for j, r in enumerate(slot_row)], np.int64)
            for t in range(steps):
                filled = np.minimum(len0 + np.minimum(t, grow), window - 1) + 1
                read += float((-(-filled // blk) * blk).sum())
            read /= steps
        for j, r in enumerate(slot_row):
            if r >= 0:
                made = min(steps, slot_left[j])
                slot_len[j] += made
                slot_left[j] -= made
                if not slot_left[j]:
                    slot_row[j] = -1
        out.append(Segment(batch, window, len(live) + len(incoming), steps, len(incoming),
                           len(distinct), moved, read))


LENGTH_DISTS = ("exponential", "cliff")


def response_lengths(n: int, mean: int, cap: int, dist: str = "exponential") -> list[int]:
    """n response lengths (tokens, the stop token included) with the given mean and cap.

    exponential: the n mid-quantiles ((i + 0.5) / n) of an exponential distribution cut at the
      cap (the rows cut at max_response_len stay at the cap), its scale solved so that the mean
      of the cut lengths is `mean`; longest first. Deterministic.
    cliff: one at the cap, the rest at the mean (`_lengths`, what the RL batch assumes).
    """
    if dist == "cliff":
        return _lengths(n, mean, cap)
    if dist != "exponential":
        raise ValueError(f"length distribution {dist!r}: one of {LENGTH_DISTS}")
    if mean >= cap:
        return [cap] * n
    q = -np.log1p(-(np.arange(n) + 0.5) / n)[::-1]  # unit-mean exponential quantiles, descending

    def lens(scale: float) -> np.ndarray:
        return np.clip(np.rint(scale * q), 1, cap)
    lo, hi = 0.0, float(mean)
    while lens(hi).mean() < mean:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if lens(mid).mean() < mean else (lo, mid)
    return [int(x) for x in lens(hi)]


class SegmentCostModel:
    """Per-device cost of one decode step (and of a call's work outside the loop) at any (B, W).

    At a compiled (B, W): that program's own counts. Elsewhere: every quantity q (FLOPs, HBM
    bytes, ICI bytes) fitted by least squares as q = c0 + c1 B + c2 B W to the compiled programs.
    c0: what a step costs whatever the batch (the weights read, or gathered, once per step); c1:
    per row (its activations, logits and sampling); c2: per row and cache slot (its K and V read
    by attention, and the attention scores). With only one batch or one window among the compiled
    programs, the terms they cannot tell apart are left out (0)."""

    FIELDS = ("flops", "bytes", "ici")
    TERMS = ("1", "B", "BW")

    def __init__(self, shapes: Sequence[SegmentShape]):
        self.exact = {(s.batch, s.window): s for s in shapes}
        pts = list(self.exact)
        batches = {b for b, _ in pts}
        self.terms_used = ["1"] + (["B"] if len(batches) > 1 else []) + (
            ["BW"] if len(pts) > len(batches) else [])
        A = np.array([self._x(b, w) for b, w in pts])
        self.coef: dict[tuple[str, str], dict[str, float]] = {}
        for which in ("per_step", "outside"):
            for f in self.FIELDS:
                y = np.array([getattr(getattr(self.exact[p], which), f) for p in pts])
                sol = np.linalg.lstsq(A, y, rcond=None)[0]
                self.coef[which, f] = {t: 0.0 for t in self.TERMS} | dict(
                    zip(self.terms_used, map(float, sol)))

    def _x(self, b: int, w: int) -> list[float]:
        return [{"1": 1.0, "B": float(b), "BW": float(b) * w}[t] for t in self.terms_used]

    def fitted(self, which: str, b: int, w: int) -> StepCost:
        x = {"1": 1.0, "B": float(b), "BW": float(b) * w}
        return StepCost(*(max(0.0, sum(c * x[t] for t, c in self.coef[which, f].items()))
                          for f in self.FIELDS))

    def per_step(self, b: int, w: int) -> StepCost:
        s = self.exact.get((b, w))
        return s.per_step if s is not None else self.fitted("per_step", b, w)

    def outside(self, b: int, w: int) -> StepCost:
        s = self.exact.get((b, w))
        return s.outside if s is not None else self.fitted("outside", b, w)

    def fit_error(self) -> float:
        """The largest relative error of the fitted per-step HBM bytes at the compiled points."""
        return max((abs(self.fitted("per_step", b, w).bytes - s.per_step.bytes)
                    / max(1.0, s.per_step.bytes) for (b, w), s in self.exact.items()), default=0.0)


@dataclasses.dataclass
class SamplingEstimate:
    """One iteration's sampling with the engine, segment by segment (roofline seconds)."""

    segments: list[Segment]
    seconds: list[float]       # the segment call: its decode loop and its other work
    prefill_s: list[float]     # the prefill + insert of its incoming rows, before it
    rearrange_s: list[float]   # the compaction / resize before it
    bounds: list[str]          # what bounds its decode steps
    exact: list[bool]          # its (B, W) was compiled (else the fitted cost model)
    layout_s: float = 0.0      # the weights' copy into the decode layout, once per call

    @property
    def total(self) -> float:
        return sum(self.seconds) + sum(self.prefill_s) + sum(self.rearrange_s) + self.layout_s


def estimate_sampling(segments: Sequence[Segment], model: SegmentCostModel, chip: Chip, *,
                      cache_slot_bytes: float, prefill: StepCost | None = None,
                      prefill_distinct: int = 1, prompt_bucket: int = 0,
                      weight_bytes: float = 0.0, multiple: int = 1,
                      layout_copy: bool = False, ragged: bool = False) -> SamplingEstimate:
    """Roofline seconds of each segment call: max over (compute, HBM, ICI) of its trips x the
    per-step cost + the call's other work at its (B, W). Before it, when the engine does them:
    a rearrange (reads and writes the new cache: 2 x B x W x cache_slot_bytes); for incoming rows
    the prefill (the compiled engine_prefill, its FLOPs, ICI and non-weight bytes scaled by the
    distinct prompts, bucketed as engine._start_rows does, over the compiled count) and the insert
    (2 x rows x prompt_bucket x cache_slot_bytes). cache_slot_bytes: a device's bytes of the cache
    per (row, slot) of the global cache (K and V of every layer, over the devices sharing it).
    layout_copy: the weights are copied into a decode layout of their own first (decode_tensor > 0;
    weight_bytes received per device over the ICI; not compiled). ragged: the ragged decode
    kernel, whose compiled cost counts every row's whole window (its static estimate); each step's
    HBM bytes then count the segment's read_slots instead of B x W slots of K and V."""
    from relift_jax import engine
    est = SamplingEstimate(list(segments), [], [], [], [], [],
                           weight_bytes / (chip.ici_bw / 2) if layout_copy else 0.0)
    for s in segments:
        step = model.per_step(s.batch, s.window)
        if ragged:
            step = dataclasses.replace(step, bytes=max(0.0, step.bytes + (
                s.read_slots - s.batch * s.window) * cache_slot_bytes))
        work = model.outside(s.batch, s.window) + s.steps * step
        est.seconds.append(work.roofline(chip).seconds)
        est.bounds.append(step.roofline(chip).bound)
        est.exact.append((s.batch, s.window) in model.exact)
        est.rearrange_s.append(2 * s.batch * s.window * cache_slot_bytes / chip.hbm_bw
                               if s.rearranged else 0.0)
        t = 0.0
        if s.incoming and prefill is not None:
            u = -(-engine._bucket(s.distinct, 1) // multiple) * multiple
            k = u / max(1, prefill_distinct)
            scaled = StepCost(k * prefill.flops,
                              weight_bytes + k * max(0.0, prefill.bytes - weight_bytes),
                              k * prefill.ici)
            t = scaled.roofline(chip).seconds
            t += 2 * s.incoming * prompt_bucket * cache_slot_bytes / chip.hbm_bw
        est.prefill_s.append(t)
    return est


# ----------------------------------------------------------------------------- the report

def _mem(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, size in (("G", GiB), ("M", 2 ** 20), ("K", 2 ** 10)):
        if x >= 0.1 * size:
            return f"{x / size:.2f}{unit}"
    return f"{x:.0f}B"


def _si(x: float, unit: str = "") -> str:
    for div, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f} {prefix}{unit}"
    return f"{x:.0f} {unit}"


def _secs(x: float) -> str:
    if x < 1e-3:
        return f"{x * 1e6:.1f} us"
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


@dataclasses.dataclass(frozen=True)
class Roofline:
    compute_s: float
    hbm_s: float
    ici_s: float

    @property
    def seconds(self) -> float:
        return max(self.compute_s, self.hbm_s, self.ici_s)

    @property
    def bound(self) -> str:
        return max((self.compute_s, "compute"), (self.hbm_s, "HBM"), (self.ici_s, "ICI"))[1]


def roofline(cost: hlo_cost.Cost, chip: Chip) -> Roofline:
    """Per-device counts against one chip: a collective's received bytes over the incoming half
    of the chip's bidirectional ICI bandwidth (every link busy: an optimistic bound)."""
    return Roofline(cost.flops / chip.peak_flops, cost.bytes / chip.hbm_bw,
                    cost.ici_bytes / (chip.ici_bw / 2))


def report(programs: Sequence[Program], c: Configs, cfg, topo: Topology, a: Assumptions,
           mesh_shape: dict, out=None) -> bool:
    """Prints the tables; returns True when every program fits."""
    out = out or sys.stdout
    chip = topo.chip
    w = lambda s="": print(s, file=out)  # noqa: E731
    w(f"\n== {topo.name} ({topo.num_chips} chips, {chip.hbm_bytes / GiB:.0f} GiB HBM, "
      f"{chip.peak_flops / 1e12:.0f} bf16 TFLOP/s, {chip.hbm_bw / 1e9:.0f} GB/s HBM, "
      f"{chip.ici_bw / 1e9:.0f} GB/s ICI bidirectional per chip; {chip.source}), mesh "
      + " x ".join(f"{k}={v}" for k, v in mesh_shape.items()))
    w(f"   model: {cfg.num_params() / 1e9:.2f} B parameters, {cfg.num_layers} layers, "
      f"params {cfg.param_dtype}, compute {cfg.compute_dtype}, remat {cfg.remat!s}, "
      f"attention {cfg.attention}")
    nw = max([9] + [len(p.name) + 1 for p in programs])
    hdr = (f"{'program':<{nw}}{'args':>8}{'out':>8}{'alias':>8}{'temp':>8}{'peak':>8}{'of HBM':>8}"
           f"{'FLOPs':>11}{'HBM bytes':>11}{'ICI bytes':>11}{'compute':>10}{'HBM':>10}"
           f"{'ICI':>10}  {'bound':<8}{'compile':>8}")
    w("\nper device, per call (memory: compiled.memory_analysis(), G = GiB, M = MiB; peak = args + "
      "out - alias + temp)")
    w(hdr)
    w("-" * len(hdr))
    fits = True
    for p in programs:
        if p.memory is None:
            w(f"{p.name:<{nw}}{'OUT OF MEMORY at compile time':<50}{'':>63}{p.compile_s:7.1f}s")
            fits = False
            continue
        m, peak = p.memory, p.peak_bytes
        r = roofline(p.cost, chip)
        fits &= peak <= chip.hbm_bytes
        w(f"{p.name:<{nw}}{_mem(m.argument_size_in_bytes):>8}{_mem(m.output_size_in_bytes):>8}"
          f"{_mem(m.alias_size_in_bytes):>8}{_mem(m.temp_size_in_bytes):>8}{_mem(peak):>8}"
          f"{peak / chip.hbm_bytes:>8.0%}{_si(p.cost.flops):>11}{_si(p.cost.bytes, 'B'):>11}"
          f"{_si(p.cost.ici_bytes, 'B'):>11}{_secs(r.compute_s):>10}{_secs(r.hbm_s):>10}"
          f"{_secs(r.ici_s):>10}  {r.bound:<8}{p.compile_s:7.1f}s")
    w(f"(total compile time {sum(p.compile_s for p in programs):.1f} s on this CPU)")
    for p in programs:
        if p.cost is not None and p.cost.custom_calls:
            w(f"{p.name}: FLOPs (and so compute time) exclude {p.cost.custom_calls:g} executions "
              f"of Pallas kernels without a cost estimate (splash attention)")

    for p in programs:
        if p.error:
            w(f"\n{p.name}: the compiler ran out of memory:\n  " + "\n  ".join(
                p.error.splitlines()[:6]))
        elif p.peak_bytes > chip.hbm_bytes:
            w(f"\n{p.name}: out of memory: {p.peak_bytes / GiB:.2f} GiB per device > "
              f"{chip.hbm_bytes / GiB:.0f} GiB HBM of a {chip.kind} chip")
        for note in p.notes:
            w(f"{p.name}: note: {note}")

    _loop_sections(programs, a, w)
    est = _engine_sections(programs, c, topo, a, w)
    _iteration(programs, c, topo, a, w, est)
    w("\nassumptions:")
    for line in a.lines(c):
        w(f"  - {line}")
    _sources(programs, w)
    return fits


def _loop_sections(programs: Sequence[Program], a: Assumptions, w) -> None:
    for p in programs:
        if p.cost is None:
            continue
        loops = "; ".join(hlo_cost.describe_loops(p.cost))
        if loops:
            w(f"\n{p.name}: loop trip counts (nested in brackets; w: XLA's windowed einsum; "
              f"?: data-dependent, counted once): {loops}")
        once = p.cost.counted_once
        if once:
            names = sorted({lp.source or "?" for lp in once})
            w(f"  {len(once)} loop(s) with a data-dependent trip count (each counted as one trip, "
              f"so FLOPs and bytes are LOWER bounds): {', '.join(names)}")
        if p.name == "decode":
            per_step = p.cost.collectives_in(p.cost.unknown_loop, per_trip=True)
            w(f"collectives inside the decode loop, per decode step (bytes received per device):")
            if not per_step:
                w("  none")
            for col in per_step:
                w(f"  {col.op:<20} {col.shape:<34} group {col.group:>4}  x{col.count:<6g}"
                  f"{_si(col.bytes, 'B'):>12}")
            total = sum(col.bytes for col in per_step)
            w(f"  {'total':<20} {'':<34} {'':>10} {'':<7}{_si(total, 'B'):>12} per step, "
              f"{_si(total * a.decode_steps, 'B')} per {a.decode_steps} steps")


SAMPLING_TARGET_S = 45.0  # issue "A rollout engine for RL lengths": one iteration's sampling


def _engine_sections(programs: Sequence[Program], c: Configs, topo: Topology, a: Assumptions,
                     w) -> "SamplingEstimate | None":
    """The engine's segments per decode step, the cost model fitted to them, and one iteration's
    sampling along engine.run's schedule; returns that estimate (None without segments)."""
    eng = [p for p in programs if p.engine is not None]
    if not eng:
        return None
    chip, ro = topo.chip, c.rollout
    info = eng[0].engine
    g = info.shapes
    segs = [p for p in eng if p.segment is not None]
    layout = ("the training mesh and parameters as they are" if not info.tensor else
              f"weights split {info.tensor} ways, replicated across data, copied there once per "
              f"sampling call")
    w(f"\nrollout engine (relift_jax.engine) on the decode layout, mesh "
      + " x ".join(f"{k}={v}" for k, v in info.mesh_shape.items())
      + f" (RolloutConfig.decode_tensor = {info.tensor}: {layout}); weights {info.dtype}, "
      f"{_mem(info.weight_bytes)} per device, {_mem(info.weight_read_bytes)} of them in the "
      f"compute dtype read per decode step; KV cache {info.cache_slot_bytes:.0f} B per device per "
      f"(row, slot) of the batch; decode attention: "
      + (f"the ragged Pallas kernel (RolloutConfig.decode_attention = 'ragged', blocks of "
         f"{info.ragged_block} slots: the compiled counts below take every row's whole window, "
         f"the estimate each row's filled blocks)" if info.ragged_block else
         "dense over the window"))
    if not segs:
        w("  (no segment program compiled: no decode estimate)")
        return None
    w(f"  segment programs ({g.segment_len} decode steps per call); per device, per decode step "
      f"(the loop's count over its trips):")
    nw = max(len(p.name) for p in segs) + 2
    w(f"  {'program':<{nw}}{'B':>6}{'rows/dev':>9}{'W':>7}{'peak':>9}{'FLOPs':>11}"
      f"{'HBM bytes':>11}{'ICI bytes':>11}{'step':>10}  bound")
    for p in segs:
        s = p.segment
        r = s.per_step.roofline(chip)
        w(f"  {p.name:<{nw}}{s.batch:>6}{s.batch // g.multiple:>9}{s.window:>7}"
          f"{_mem(p.peak_bytes):>9}{_si(s.per_step.flops):>11}{_si(s.per_step.bytes, 'B'):>11}"
          f"{_si(s.per_step.ici, 'B'):>11}{_secs(r.seconds):>10}  {r.bound}")
    outside = [p.segment.outside.bytes for p in segs]
    w(f"  outside the loop, per call: {_si(min(outside), 'B')} to {_si(max(outside), 'B')} of HBM "
      f"traffic")
    first = segs[0]
    w(f"  collectives inside the decode loop of {first.name}, per decode step (bytes received "
      f"per device):")
    for col in first.segment.loop_collectives:
        w(f"    {col.op:<20} {col.shape:<30} group {col.group:>4}  x{col.count:<6g}"
          f"{_si(col.bytes, 'B'):>12}")
    if not first.segment.loop_collectives:
        w("    none")
    w(f"    the others: " + "; ".join(
        f"{p.name} {_si(sum(col.bytes for col in p.segment.loop_collectives), 'B')}"
        for p in segs[1:]))
    if info.ragged_block:
        calls = sorted({p.segment.kernels for p in segs})
        w(f"  ragged attention kernel calls per decode step: "
          + " to ".join(f"{x:g}" for x in dict.fromkeys([calls[0], calls[-1]]))
          + f" (the model has {info.layers} layers)")
    with_gathers = [p for p in segs if p.segment.weight_gathers]
    if not with_gathers:
        w(f"  weight all-gathers inside the decode loop: none (in all {len(segs)} segment "
          f"programs)")
    else:
        p = with_gathers[0]
        got = sum(col.bytes for col in p.segment.weight_gathers)
        n = sum(col.count for col in p.segment.weight_gathers)
        w(f"  weight all-gathers inside the decode loop: {n:g} per step, {_si(got, 'B')} received "
          f"per device per step ({p.name}; in {len(with_gathers)} of {len(segs)} segment "
          f"programs): " + ", ".join(f"{col.shape} x{col.count:g}"
                                     for col in p.segment.weight_gathers))

    model = SegmentCostModel([p.segment for p in segs])
    w(f"  cost model of one decode step where no program was compiled, per device, least squares "
      f"over the {len(segs)} compiled: q = c0 + c1 B + c2 B W (B slots, W window slots):")
    for f, label, unit in (("bytes", "HBM bytes", "B"), ("flops", "FLOPs", ""),
                           ("ici", "ICI bytes", "B")):
        co = model.coef["per_step", f]
        w(f"    {label:<10} c0 {_si(co['1'], unit):>11}   c1 {_si(co['B'], unit):>11} per row   "
          f"c2 {_si(co['BW'], unit):>9} per (row, slot)")
    w(f"    (c0 against the weights a step reads, {_mem(info.weight_read_bytes)}; c2 against the "
      f"cache's own {info.cache_slot_bytes:.0f} B per (row, slot); the fit misses the compiled "
      f"HBM bytes by up to {model.fit_error():.0%})")

    n = ro.questions_per_iteration * ro.group_size
    lens = response_lengths(n, a.mean_response_len, ro.max_response_len, a.length_dist)
    prefill = next((p for p in eng if p.name == "engine_prefill" and p.cost is not None), None)

    def simulate(segments):
        return estimate_sampling(segments, model, chip, cache_slot_bytes=info.cache_slot_bytes,
                                 prefill=_step_cost(prefill.cost) if prefill else None,
                                 prefill_distinct=g.distinct, prompt_bucket=g.prompt_bucket,
                                 weight_bytes=info.weight_bytes, multiple=g.multiple,
                                 layout_copy=bool(info.tensor), ragged=bool(info.ragged_block))
    est = simulate(list(info.schedule))
    at_cap = sum(x >= ro.max_response_len for x in lens)
    w(f"\n  one iteration's sampling with the engine: {n} rollouts; prompts {a.prompt_len} tokens; "
      f"responses {a.length_dist}: mean {np.mean(lens):.0f}, median {np.median(lens):.0f}, "
      f"max {max(lens)}, {at_cap} at the cap; the schedule engine.run makes of them "
      f"({ro.decode_slots or 'all'} slots, segments of {g.segment_len} steps):")
    w(f"    {'B':>6}{'W':>7}{'segments':>10}{'steps':>7}{'live rows':>12}{'per step':>10}"
      f"{'seconds':>10}  bound")
    segments = est.segments
    i = 0
    while i < len(segments):
        j = i
        while j < len(segments) and (segments[j].batch, segments[j].window) == \
                (segments[i].batch, segments[i].window):
            j += 1
        part = segments[i:j]
        steps = sum(s.steps for s in part)
        secs = sum(est.seconds[i:j])
        live = f"{part[0].live}-{part[-1].live}" if part[0].live != part[-1].live \
            else f"{part[0].live}"
        bounds = "/".join(sorted(set(est.bounds[i:j])))
        w(f"    {part[0].batch:>6}{part[0].window:>7}{j - i:>10}{steps:>7}{live:>12}"
          f"{_secs(secs / max(1, steps)):>10}{_secs(secs):>10}  {bounds}"
          + ("" if all(est.exact[i:j]) else "  (fitted: not compiled)"))
        i = j
    steps = sum(s.steps for s in segments)
    n_pre = sum(1 for s in segments if s.incoming)
    n_re = sum(1 for s in segments if s.rearranged)
    w(f"    decode {_secs(sum(est.seconds))} over {steps} steps; prefill + insert "
      f"{_secs(sum(est.prefill_s))} ({n_pre} call(s)); rearranges {_secs(sum(est.rearrange_s))} "
      f"({n_re})" + (f"; the weights' copy into the layout {_secs(est.layout_s)} ("
                     f"{_mem(info.weight_bytes)} received per device over the ICI, not "
                     f"compiled)" if est.layout_s else ""))
    window_kv = sum(s.steps * s.batch * s.window for s in segments) * info.cache_slot_bytes
    kv = (sum(s.steps * s.read_slots for s in segments) * info.cache_slot_bytes
          if info.ragged_block else window_kv)
    total = sum(s.steps * model.per_step(s.batch, s.window).bytes
                + model.outside(s.batch, s.window).bytes for s in segments) - window_kv + kv
    wts = sum(s.steps for s in segments) * info.weight_read_bytes
    what = (f"K and V read by the ragged kernel ({kv / window_kv:.0%} of the windows'; "
            f"blocks of {info.ragged_block} slots)" if info.ragged_block else
            "K and V of the window")
    w(f"    where the decode's HBM traffic goes ({_si(total, 'B')} per device, "
      f"{_secs(total / chip.hbm_bw)}): weights {_secs(wts / chip.hbm_bw)} "
      f"({wts / total:.0%}), {what} {_secs(kv / chip.hbm_bw)} ({kv / total:.0%}), "
      f"the rest (attention scores, logits, activations, copies) "
      f"{_secs((total - wts - kv) / chip.hbm_bw)} ({(total - wts - kv) / total:.0%})")
    other = [d for d in LENGTH_DISTS if d != a.length_dist][0]
    alt = simulate(iteration_schedule(c, a, g.multiple, other))
    verdict = "met" if est.total <= SAMPLING_TARGET_S else "MISSED"
    w(f"  sampling estimate: {_secs(est.total)} per iteration (target <= "
      f"{SAMPLING_TARGET_S:.0f} s: {verdict}); with the {other} lengths: {_secs(alt.total)}"
      + ("" if all(alt.exact) else " (partly fitted)"))
    t = {p.name: roofline(p.cost, chip).seconds for p in programs
         if p.name in ("prefill", "decode") and p.cost is not None}
    if len(t) == 2:
        w(f"  the dense sampler (prefill + decode above, on the training mesh): "
          f"{_secs(t['prefill'] + t['decode'])} (prefill {_secs(t['prefill'])} + "
          f"{a.decode_steps} decode steps {_secs(t['decode'])})")
    return est


def _iteration(programs: Sequence[Program], c: Configs, topo: Topology, a: Assumptions, w,
               engine_estimate: "SamplingEstimate | None" = None) -> None:
    by = {p.name: p for p in programs if p.cost is not None}
    t = {name: roofline(p.cost, topo.chip) for name, p in by.items()}
    w(f"\none iteration on {topo.name} (roofline: each program at max(compute, HBM, ICI); "
      f"a lower bound):")
    rows = []
    if engine_estimate is not None:
        e = engine_estimate
        rows.append(("sampling", e.total,
                     f"rollout engine: {len(e.segments)} segments, "
                     f"{sum(s.steps for s in e.segments)} decode steps (responses "
                     f"{a.length_dist}, mean {a.mean_response_len}); see above"))
    elif "prefill" in t and "decode" in t:
        rows.append(("sampling", t["prefill"].seconds + t["decode"].seconds,
                     f"prefill {_secs(t['prefill'].seconds)} + decode {a.decode_steps} x "
                     f"{_secs(t['decode'].seconds / a.decode_steps)} ({t['decode'].bound}-bound)"))
    if "rl_step" in t:
        rows.append(("RL", c.rl.num_mini_batches * t["rl_step"].seconds,
                     f"{c.rl.num_mini_batches} x {_secs(t['rl_step'].seconds)} "
                     f"({t['rl_step'].bound}-bound)"))
    if "sft_step" in t:
        rows.append(("SFT", c.sft.steps_per_trigger * t["sft_step"].seconds,
                     f"{c.sft.steps_per_trigger} x {_secs(t['sft_step'].seconds)} when it fires "
                     f"({t['sft_step'].bound}-bound)"))
    if not rows:
        w("  (no program of the estimate compiled)")
    for name, s, how in rows:
        w(f"  {name:<10}{_secs(s):>10}   {how}")
    d = dict((n, s) for n, s, _ in rows)
    if "RL" in d and "SFT" in d:
        w(f"  {'RL + SFT':<10}{_secs(d['RL'] + d['SFT']):>10}   an iteration in which SFT fires")
    if len(d) == 3:
        full = d["sampling"] + d["RL"] + d["SFT"]
        mean = d["sampling"] + d["RL"] + a.sft_fraction * d["SFT"]
        w(f"  {'total':<10}{_secs(full):>10}   (with SFT); {_secs(mean)} on average "
          f"(SFT in {a.sft_fraction:.0%} of iterations)")


def _sources(programs: Sequence[Program], w) -> None:
    nw = max([9] + [len(p.name) + 1 for p in programs])
    w("\nsources: memory: compiled.memory_analysis() of the TPU executable (per device); an "
      "executable\n  over the chip's HBM is out of memory. FLOPs (dot/convolution only), HBM bytes "
      "and ICI bytes:\n  relift_jax.hlo_cost over compiled.as_text(), through loop trip counts. "
      "compiled.cost_analysis()\n  counts each loop body once; against our count with every trip "
      "count 1:")
    for p in programs:
        if p.cost is None or not p.xla_cost:
            continue
        xf, xb = p.xla_cost.get("flops", 0.0), p.xla_cost.get("bytes accessed", 0.0)
        w(f"  {p.name:<{nw}} cost_analysis: {_si(xf):>10} FLOPs {_si(xb, 'B'):>11}   ours, loops "
          f"once: {_si(p.cost.flops_once):>10} FLOPs {_si(p.cost.bytes_once, 'B'):>11}")


# ----------------------------------------------------------------------------- command line

def run(gin_files: Sequence[str], topology: str, bindings: Sequence[str] = (), *,
        functions: Sequence[str] = FUNCTIONS,
        assumptions: dict | None = None, dump_hlo: str | None = None, out=None) -> int:
    """Compiles and reports; returns the exit status (0 fits, 3 out of memory, 2 a configuration
    error, printed as one line)."""
    from relift_jax import sharding
    from relift_jax.config import ConfigError
    out = out or sys.stdout
    try:  # everything that a wrong name or binding breaks, before any compilation
        topo = parse_topology(topology)
        c = load_configs(gin_files, bindings)
        cfg = model_config(c.model)
        a = default_assumptions(c, **(assumptions or {}))
        devices = topology_devices(topo)
        mesh = sharding.make_mesh(c.mesh, devices)
        if c.rollout.decode_tensor:  # the decode layout's mesh (rollout.DecodeLayout)
            try:
                sharding.MeshConfig(data=-1, fsdp=1, tensor=c.rollout.decode_tensor).shape(
                    len(devices))
            except ValueError as e:
                raise ConfigError(f"RolloutConfig.decode_tensor = {c.rollout.decode_tensor} on "
                                  f"{len(devices)} devices: {e}") from e
    except (ConfigError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    mesh_shape = dict(zip(mesh.axis_names, mesh.axis_sizes))
    print(f"compiling for {topo.name} ({len(devices)} compile-only {devices[0].device_kind} "
          f"devices), mesh {mesh_shape} ...", file=out, flush=True)
    programs = compile_iteration(c, cfg, mesh, a, functions=functions, keep_hlo=bool(dump_hlo),
                                 log=lambda s: print(s, file=out, flush=True))
    if dump_hlo:
        os.makedirs(dump_hlo, exist_ok=True)
        for p in programs:
            if p.hlo:
                with open(os.path.join(dump_hlo, f"{p.name}.hlo.txt"), "w") as f:
                    f.write(p.hlo)
    if not report(programs, c, cfg, topo, a, mesh_shape, out=out):
        over = [p.name for p in programs if p.memory is None or p.peak_bytes > topo.chip.hbm_bytes]
        print(f"\nerror: out of memory: {', '.join(over)} "
              f"{'does' if len(over) == 1 else 'do'} not fit in "
              f"{topo.chip.hbm_bytes / GiB:.0f} GiB per {topo.chip.kind} chip", file=out)
        return EXIT_OOM
    headroom = 1 - max(p.peak_bytes for p in programs) / topo.chip.hbm_bytes
    print(f"\nfits: the largest program leaves {headroom:.0%} of HBM free", file=out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m relift_jax.aot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
    p.add_argument("--topology", required=True,
                   help="v5p-64, v4-64, v5p-8, v6e-64, v5e-16, ... or TYPE:AxB[xC]")
    p.add_argument("--functions", default=",".join(FUNCTIONS),
                   help=f"comma-separated subset of {','.join(FUNCTIONS)} (init always "
                        f"compiles; prefill/decode: the dense sampler, engine_*: the rollout "
                        f"engine)")
    p.add_argument("--prompt_len", type=int, help="assumed prompt length (max_prompt_len)")
    p.add_argument("--mean_response_len", type=int, help="assumed mean response length (3500)")
    p.add_argument("--decode_steps", type=int,
                   help="assumed dense decode steps (max_response_len)")
    p.add_argument("--length_dist", choices=LENGTH_DISTS,
                   help="assumed rollout lengths for the engine's schedule: exponential (mean "
                        "--mean_response_len cut at max_response_len; the default) or cliff "
                        "(one at the cap, the rest at the mean)")
    p.add_argument("--sft_fraction", type=float, help="share of iterations with SFT (0.06)")
    p.add_argument("--dump_hlo", help="write each compiled program's HLO text to this folder")
    args, rest = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    bindings = []
    for r in rest:
        name, eq, value = r[len("--gin."):].partition("=") if r.startswith("--gin.") else ("", "", "")
        if not eq:
            p.error(f"unrecognised argument {r!r} (gin bindings are --gin.NAME=VALUE)")
        bindings.append(f"{name} = {value}")
    if not args.gin_file:
        p.error("give at least one --gin_file")
    functions = [f for f in args.functions.split(",") if f]
    bad = set(functions) - set(FUNCTIONS)
    if bad:
        p.error(f"--functions: unknown {sorted(bad)}")
    return run(args.gin_file, args.topology, bindings, functions=functions,
               assumptions=dict(prompt_len=args.prompt_len,
                                mean_response_len=args.mean_response_len,
                                decode_steps=args.decode_steps, sft_fraction=args.sft_fraction,
                                length_dist=args.length_dist),
               dump_hlo=args.dump_hlo)


if __name__ == "__main__":
    sys.exit(main())
