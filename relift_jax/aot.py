"""Ahead-of-time compilation for a TPU topology, on this CPU: does one ReLIFT iteration fit, and how
long would it take?

  python -m relift_jax.aot --gin_file=gin/experiments/qwen2.5_math_7b_v5p-64.gin --topology=v5p-64

Compiles, at the configuration's exact shapes and with the run's own shardings, the programs of one
iteration: the train-state initialisation, the RL step, the SFT step, the sampler's prefill and its
decode loop. Nothing is materialised: the inputs are `jax.ShapeDtypeStruct`s with shardings on the
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
- FLOPs and bytes: `compiled.cost_analysis()` counts a while body ONCE, so they are counted here from
  the compiled HLO text (`hlo_cost`): dot/convolution FLOPs and the operand + output bytes of every
  top-level instruction (fusions as one; a dynamic slice counts the slice, an in-place
  dynamic-update-slice the update), each multiplied by the trip counts of the loops around it
  (known_trip_count when XLA annotates it, else read off the loop condition `i < N` and the
  increment; the decode loop's data-dependent count is an assumption: --decode_steps).
- time: max(FLOPs / peak, HBM bytes / HBM bandwidth, ICI bytes / ICI bandwidth) per program: a
  lower bound with perfect overlap at peak; see CHIPS for the chip numbers and their sources.

Shape key: N questions per iteration, G samples per question, B sampler rows, P padded prompt
length, S = P + max new tokens cache slots, M micro-batches, b rows per micro-batch, T row length.
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

    def lines(self, c: Configs) -> list[str]:
        ro = c.rollout
        return [
            f"prompts: all {self.prompt_len} tokens (max_prompt_len {ro.max_prompt_len})",
            f"responses and demonstrations: mean {self.mean_response_len} tokens, and in every "
            f"batch one at the cap {ro.max_response_len} (the longest sequence, "
            f"{self.prompt_len + ro.max_response_len} tokens, sets the row length)",
            f"decode loop: {self.decode_steps} steps (it runs until all "
            f"{ro.questions_per_iteration * ro.group_size} rows stop; one uncapped row keeps it "
            f"going to max_response_len)",
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
                      functions: Sequence[str] = ("rl", "sft", "prefill", "decode"),
                      keep_hlo: bool = False, log: Callable[[str], None] = print) -> list[Program]:
    """Compiles the iteration's programs on `mesh` (a mesh of compile-only TPU devices): the train
    state's init always, then the chosen ones of rl, sft, prefill, decode."""
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
    hdr = (f"{'program':<9}{'args':>8}{'out':>8}{'alias':>8}{'temp':>8}{'peak':>8}{'of HBM':>8}"
           f"{'FLOPs':>11}{'HBM bytes':>11}{'ICI bytes':>11}{'compute':>10}{'HBM':>10}"
           f"{'ICI':>10}  {'bound':<8}{'compile':>8}")
    w("\nper device, per call (memory: compiled.memory_analysis(), G = GiB, M = MiB; peak = args + "
      "out - alias + temp)")
    w(hdr)
    w("-" * len(hdr))
    fits = True
    for p in programs:
        if p.memory is None:
            w(f"{p.name:<9}{'OUT OF MEMORY at compile time':<50}{'':>63}{p.compile_s:7.1f}s")
            fits = False
            continue
        m, peak = p.memory, p.peak_bytes
        r = roofline(p.cost, chip)
        fits &= peak <= chip.hbm_bytes
        w(f"{p.name:<9}{_mem(m.argument_size_in_bytes):>8}{_mem(m.output_size_in_bytes):>8}"
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
    _iteration(programs, c, topo, a, w)
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


def _iteration(programs: Sequence[Program], c: Configs, topo: Topology, a: Assumptions, w) -> None:
    by = {p.name: p for p in programs if p.cost is not None}
    t = {name: roofline(p.cost, topo.chip) for name, p in by.items()}
    w(f"\none iteration on {topo.name} (roofline: each program at max(compute, HBM, ICI); "
      f"a lower bound):")
    rows = []
    if "prefill" in t and "decode" in t:
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
    w("\nsources: memory: compiled.memory_analysis() of the TPU executable (per device); an "
      "executable\n  over the chip's HBM is out of memory. FLOPs (dot/convolution only), HBM bytes "
      "and ICI bytes:\n  relift_jax.hlo_cost over compiled.as_text(), through loop trip counts. "
      "compiled.cost_analysis()\n  counts each loop body once; against our count with every trip "
      "count 1:")
    for p in programs:
        if p.cost is None or not p.xla_cost:
            continue
        xf, xb = p.xla_cost.get("flops", 0.0), p.xla_cost.get("bytes accessed", 0.0)
        w(f"  {p.name:<9} cost_analysis: {_si(xf):>10} FLOPs {_si(xb, 'B'):>11}   ours, loops "
          f"once: {_si(p.cost.flops_once):>10} FLOPs {_si(p.cost.bytes_once, 'B'):>11}")


# ----------------------------------------------------------------------------- command line

def run(gin_files: Sequence[str], topology: str, bindings: Sequence[str] = (), *,
        functions: Sequence[str] = ("rl", "sft", "prefill", "decode"),
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
    p.add_argument("--functions", default="rl,sft,prefill,decode",
                   help="comma-separated subset of rl,sft,prefill,decode (init always compiles)")
    p.add_argument("--prompt_len", type=int, help="assumed prompt length (max_prompt_len)")
    p.add_argument("--mean_response_len", type=int, help="assumed mean response length (3500)")
    p.add_argument("--decode_steps", type=int, help="assumed decode steps (max_response_len)")
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
    bad = set(functions) - {"rl", "sft", "prefill", "decode"}
    if bad:
        p.error(f"--functions: unknown {sorted(bad)}")
    return run(args.gin_file, args.topology, bindings, functions=functions,
               assumptions=dict(prompt_len=args.prompt_len,
                                mean_response_len=args.mean_response_len,
                                decode_steps=args.decode_steps, sft_fraction=args.sft_fraction),
               dump_hlo=args.dump_hlo)


if __name__ == "__main__":
    sys.exit(main())
