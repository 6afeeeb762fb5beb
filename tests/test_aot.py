"""relift_jax.aot and relift_jax.hlo_cost: ahead-of-time compilation for a TPU topology on this CPU.

Compiling for a topology needs libtpu (`pip install -e '.[aot]'`); those tests skip without it. The
topology names and the HLO arithmetic are checked either way where they need no compiler.
"""
from __future__ import annotations

import dataclasses
import io
import os
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from relift_jax import aot, hlo_cost

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "gin", "tests", "tiny_e2e.gin")

needs_libtpu = pytest.mark.skipif(not aot.libtpu_available(),
                                  reason="libtpu is not installed (pip install -e '.[aot]')")


# ----------------------------------------------------------------------------- topology names

@pytest.mark.parametrize("name, expected, chips", [
    ("v5p-64", "v5p:2x4x4", 32), ("v5p-128", "v5p:4x4x4", 64), ("v5p-8", "v5p:2x2x1", 4),
    ("v4-64", "v4:2x4x4", 32), ("v6e-64", "v6e:8x8", 64), ("v5e-16", "v5e:4x4", 16),
    ("v5litepod-4", "v5e:2x2", 4), ("v5p:2x2x1", "v5p:2x2x1", 4)])
def test_topology_names(name, expected, chips):
    t = aot.parse_topology(name)
    assert (t.name, t.num_chips) == (expected, chips)


@pytest.mark.parametrize("name", ["v5p-63", "v3-8", "tpu", "v6e-3"])
def test_bad_topology_names_say_the_rule(name):
    with pytest.raises(ValueError, match="topology"):
        aot.parse_topology(name)


@needs_libtpu
@pytest.mark.parametrize("name", ["v5p-8", "v5p-64", "v5p-128", "v4-64", "v6e-64", "v5e-16"])
def test_libtpu_accepts_the_topologies(name):
    t = aot.parse_topology(name)
    devices = aot.topology_devices(t)
    assert len(devices) == t.num_chips


@needs_libtpu
@pytest.mark.parametrize("data,fsdp,tensor", [(-1, 1, 4), (1, 32, 2), (-1, 1, 2), (-1, 1, 8)])
def test_meshes_that_split_a_physical_axis_build(data, fsdp, tensor):
    """v6e-64 is an 8x8 torus: an axis of 2 or 4 splits a physical axis, which jax.make_mesh
    refuses; sharding.make_mesh builds it anyway (every chip once), e.g. a 4-way sampler layout."""
    from relift_jax import sharding
    devices = aot.topology_devices(aot.parse_topology("v6e-64"))
    mesh = sharding.make_mesh(sharding.MeshConfig(data=data, fsdp=fsdp, tensor=tensor), devices)
    assert mesh.shape["tensor"] == tensor and mesh.devices.size == 64
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)


# ----------------------------------------------------------------------------- loop-aware counts

def _tpu_mesh(n: int = 4):
    devices = aot.topology_devices(aot.parse_topology("v5p:2x2x1"))[:n]
    return jax.sharding.Mesh(np.array(devices), ("x",))


def _compile(fn, *args):
    return jax.jit(fn).lower(*args).compile()


@needs_libtpu
def test_scan_flops_are_trip_count_times_the_body():
    """A scan of N matmuls (with a nested scan of 3): ours = N x 3 x the body's hand count, while
    cost_analysis() counts the body once."""
    mesh = _tpu_mesh()
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    N, m, d = 12, 512, 256

    def f(x_MxD, w_NxDxD):
        def body(x, w):
            return jax.lax.scan(lambda y, _: (jnp.tanh(y @ w), None), x, None, length=3)[0], None
        return jax.lax.scan(body, x_MxD, w_NxDxD)[0]
    c = _compile(f, jax.ShapeDtypeStruct((m, d), jnp.bfloat16, sharding=rows),
                 jax.ShapeDtypeStruct((N, d, d), jnp.bfloat16, sharding=rep))
    body = 2 * (m // 4) * d * d  # one matmul on one device's rows
    cost = hlo_cost.analyse(c.as_text())
    assert cost.flops == N * 3 * body
    assert cost.flops_once == body
    assert [(lp.trips, lp.known) for lp in cost.loops] == [(N, True), (3, True)]
    # XLA's own count: the body once, plus a little elementwise work
    assert body <= c.cost_analysis()["flops"] < 1.1 * body


@needs_libtpu
def test_fori_loop_start_and_collectives_per_trip():
    """fori_loop(3, 10): 7 trips; an all-gather inside counts (n - 1) shards per trip."""
    mesh = _tpu_mesh()
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def f(w_sharded, x):
        def body(i, x):
            w = jax.lax.with_sharding_constraint(w_sharded * i.astype(w_sharded.dtype), rep)
            return jnp.tanh(x @ w)
        return jax.lax.fori_loop(3, 10, body, x)
    c = _compile(f, jax.ShapeDtypeStruct((256, 256), jnp.float32, sharding=rows),
                 jax.ShapeDtypeStruct((64, 256), jnp.float32, sharding=rep))
    cost = hlo_cost.analyse(c.as_text())
    assert [lp.trips for lp in cost.loops] == [7]
    assert cost.flops == 7 * 2 * 64 * 256 * 256
    gathers = [col for col in cost.collectives if col.op == "all-gather"]
    assert gathers, "the constraint should gather the sharded weights inside the loop"
    per_trip = cost.collectives_in(cost.loops[0].id, per_trip=True)
    shard_bytes = 64 * 256 * 4  # one device's quarter of w
    assert sum(col.bytes for col in per_trip if col.op == "all-gather") == 3 * shard_bytes


@needs_libtpu
def test_data_dependent_loop_takes_the_assumed_trip_count():
    mesh = _tpu_mesh()
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def f(x, stop):
        def cond(s):
            return (s[0] < 100) & (jnp.sum(s[1]) < stop)
        return jax.lax.while_loop(cond, lambda s: (s[0] + 1, s[1] @ s[1]), (0, x))[1]
    c = _compile(f, jax.ShapeDtypeStruct((128, 128), jnp.float32, sharding=rep),
                 jax.ShapeDtypeStruct((), jnp.float32, sharding=rep))
    cost = hlo_cost.analyse(c.as_text(), unknown_trips=40)
    assert [(lp.trips, lp.known) for lp in cost.loops] == [(40, False)]
    assert cost.flops == 40 * 2 * 128 ** 3


@needs_libtpu
def test_inner_loop_bound_by_the_outer_index_is_counted_once_and_named():
    """A triangular pair of loops (as blockwise attention's causal skip): the inner trip count is
    data-dependent, counted as one trip and listed with the source line that made it."""
    mesh = _tpu_mesh(1)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def f(x):
        def outer(i, x):
            return jax.lax.fori_loop(0, i + 1, lambda j, y: jnp.tanh(y @ y), x)  # inner
        return jax.lax.fori_loop(0, 6, outer, x)
    c = _compile(f, jax.ShapeDtypeStruct((128, 128), jnp.float32, sharding=rep))
    cost = hlo_cost.analyse(c.as_text(), unknown_trips=1000)  # not for an inner loop
    assert [(lp.trips, lp.known) for lp in cost.loops] == [(6, True), (1, False)]
    assert cost.flops == 6 * 2 * 128 ** 3  # a lower bound: really 21 matmuls
    (once,) = cost.counted_once
    assert once.source.startswith("test_aot.py:") and "outer" in once.source
    assert list(hlo_cost.describe_loops(cost)) == ["6 x [1?]"]


@needs_libtpu
def test_attention_einsums_as_convolutions_count_exactly():
    """TPU compilers write batched matmuls as dilated convolutions; their FLOPs still come out as
    2 x the multiply-adds of the einsum (padding and dilation holes not counted)."""
    mesh = _tpu_mesh(1)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    B, T, S, K, R, E = 4, 64, 88, 2, 2, 16

    def f(q, k, v):
        s = jnp.einsum("btkre,bkse->bkrts", q, k, preferred_element_type=jnp.float32)
        return jnp.einsum("bkrts,bkse->btkre", jax.nn.softmax(s).astype(v.dtype), v)
    c = _compile(f, jax.ShapeDtypeStruct((B, T, K, R, E), jnp.bfloat16, sharding=rep),
                 jax.ShapeDtypeStruct((B, K, S, E), jnp.bfloat16, sharding=rep),
                 jax.ShapeDtypeStruct((B, K, S, E), jnp.bfloat16, sharding=rep))
    assert hlo_cost.analyse(c.as_text()).flops == 2 * (2 * B * T * S * K * R * E)


def test_hlo_parsing_of_a_hand_written_loop():
    """The trip count read off `i < N` with a start and a step, and a dynamic-slice counting only
    its slice (no compiler needed)."""
    text = """HloModule m, num_partitions=1

%fused (p0: f32[10,64,64], p1: s32[]) -> f32[64,64] {
  %p0 = f32[10,64,64]{2,1,0} parameter(0)
  %p1 = s32[]{:T(128)} parameter(1)
  %z = s32[] constant(0)
  %ds = f32[1,64,64]{2,1,0} dynamic-slice(%p0, %p1, %z, %z), dynamic_slice_sizes={1,64,64}
  ROOT %b = f32[64,64]{1,0} bitcast(%ds)
}

%body (t: (s32[], f32[8,64], f32[10,64,64])) -> (s32[], f32[8,64], f32[10,64,64]) {
  %t = (s32[], f32[8,64]{1,0}, f32[10,64,64]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = f32[8,64]{1,0} get-tuple-element(%t), index=1
  %w = f32[10,64,64]{2,1,0} get-tuple-element(%t), index=2
  %wi = f32[64,64]{1,0} fusion(%w, %i), kind=kLoop, calls=%fused
  %y = f32[8,64]{1,0} dot(%x, %wi), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %two = s32[] constant(2)
  %next = s32[] add(%i, %two)
  ROOT %out = (s32[], f32[8,64]{1,0}, f32[10,64,64]{2,1,0}) tuple(%next, %y, %w)
}

%cond (t: (s32[], f32[8,64], f32[10,64,64])) -> pred[] {
  %t = (s32[], f32[8,64]{1,0}, f32[10,64,64]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %n = s32[] constant(10)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (x: f32[8,64], w: f32[10,64,64]) -> f32[8,64] {
  %x = f32[8,64]{1,0} parameter(0)
  %w = f32[10,64,64]{2,1,0} parameter(1)
  %one = s32[] constant(1)
  %init = (s32[], f32[8,64]{1,0}, f32[10,64,64]{2,1,0}) tuple(%one, %x, %w)
  %loop = (s32[], f32[8,64]{1,0}, f32[10,64,64]{2,1,0}) while(%init), condition=%cond, body=%body
  ROOT %r = f32[8,64]{1,0} get-tuple-element(%loop), index=1
}
"""
    cost = hlo_cost.analyse(text)
    assert [lp.trips for lp in cost.loops] == [5]  # i = 1, 3, 5, 7, 9
    assert cost.flops == 5 * 2 * 8 * 64 * 64
    slice_bytes = 64 * 64 * 4
    dot_bytes = (8 * 64 + 64 * 64 + 8 * 64) * 4
    # per trip: the fusion reads the slice (and its s32 index), writes it; the dot; the s32 add
    assert cost.bytes == 5 * ((2 * slice_bytes + 4) + dot_bytes + 3 * 4)


# ----------------------------------------------------------------------------- the tool

@needs_libtpu
def test_tiny_config_compiles_every_program_and_prints_the_table():
    out = io.StringIO()
    rc = aot.run([TINY], "v5p:2x2x1", out=out)
    text = out.getvalue()
    assert rc == 0, text
    for name in ("init", "rl_step", "sft_step", "prefill", "decode", "engine_prefill",
                 "segment_b16_w64", "segment_b16_w128", "segment_b4_w128"):
        assert f"\n{name:<9}" in text, f"{name} row missing:\n{text}"
    assert "collectives inside the decode loop, per decode step" in text
    # the engine on the training (FSDP) layout: its segments gather the weights every step
    assert "collectives inside the decode loop of segment_b16_w64, per decode step" in text
    assert re.search(r"weight all-gathers inside the decode loop: \d+ per step", text), text
    assert "cost model of one decode step" in text
    assert re.search(r"sampling estimate: .* per iteration \(target <= 45 s: met\)", text), text
    assert "sampling" in text and "rollout engine:" in text
    assert "RL + SFT" in text and "sampling" in text
    assert "loops once" in text and "assumptions:" in text
    assert "fits: the largest program leaves" in text


@needs_libtpu
def test_out_of_memory_exits_non_zero_with_the_message(capsys):
    """A KV cache far beyond a v5e chip's 16 GiB: the compiler's message and exit status 3."""
    rc = aot.main(["--gin_file", TINY, "--topology", "v5e:2x2", "--functions", "prefill",
                   "--gin.RolloutConfig.questions_per_iteration=256",
                   "--gin.RolloutConfig.group_size=16",
                   "--gin.RolloutConfig.max_response_len=1048576"])
    text = capsys.readouterr().out
    assert rc == aot.EXIT_OOM, text
    assert "error: out of memory: prefill does not fit in 16 GiB per v5e chip" in text
    assert "RESOURCE_EXHAUSTED" in text or "GiB per device >" in text


def test_config_errors_exit_2(capsys):
    rc = aot.main(["--gin_file", TINY, "--topology", "v9-8"])
    assert rc == 2
    assert "topology" in capsys.readouterr().err


@needs_libtpu
def test_a_decode_layout_that_does_not_divide_the_devices_exits_2(capsys):
    rc = aot.main(["--gin_file", TINY, "--topology", "v5p:2x2x1",
                   "--gin.RolloutConfig.decode_tensor=3"])
    assert rc == 2
    assert "RolloutConfig.decode_tensor = 3 on 4 devices" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the rollout engine

@needs_libtpu
def test_engine_on_its_own_layout_has_no_weight_gathers_in_the_decode_loop():
    """decode_tensor = 2 on 4 devices (data 2 x tensor 2): the segments' loops gather no weight,
    where the training (FSDP) layout gathers them every step (the default tiny run above)."""
    out = io.StringIO()
    rc = aot.run([TINY], "v5p:2x2x1", ["RolloutConfig.decode_tensor = 2"],
                 functions=["engine_prefill", "engine_segment"], out=out)
    text = out.getvalue()
    assert rc == 0, text
    assert "mesh data=2 x fsdp=1 x tensor=2 (RolloutConfig.decode_tensor = 2" in text
    assert "weight all-gathers inside the decode loop: none" in text
    for name in ("engine_prefill", "segment_b16_w64", "segment_b16_w128", "segment_b2_w128"):
        assert f"\n{name} " in text, f"{name} row missing:\n{text}"
    assert "sampling estimate:" in text and "target <= 45 s" in text
    assert "the weights' copy into the layout" in text


@needs_libtpu
def test_engine_with_the_ragged_decode_kernel():
    """RolloutConfig.decode_attention = 'ragged' on the decode layout: every segment's decode step
    calls the Pallas kernel once per layer, inside the shard_map, with no weight gathered."""
    out = io.StringIO()
    rc = aot.run([TINY], "v5p:2x2x1", ["RolloutConfig.decode_tensor = 2",
                                       "RolloutConfig.decode_attention = 'ragged'"],
                 functions=["engine_segment"], out=out)
    text = out.getvalue()
    assert rc == 0, text
    layers = int(re.search(r"the model has (\d+) layers", text).group(1))
    assert f"ragged attention kernel calls per decode step: {layers} (" in text, text
    assert "weight all-gathers inside the decode loop: none" in text
    assert "K and V read by the ragged kernel" in text and "sampling estimate:" in text


def _segment_shape(B, W, c0=4e9, c1=2e6, c2=2e3, steps=32):
    return aot.SegmentShape(B, W, steps, aot.StepCost(1e9 * B, c0 + c1 * B + c2 * B * W, 1e5 * B),
                            aot.StepCost(0.0, 1e8, 0.0))


def test_cost_model_recovers_a_bilinear_cost_and_prefers_compiled_points():
    shapes = [_segment_shape(1024, 4096), _segment_shape(1024, 16384), _segment_shape(64, 16384),
              _segment_shape(256, 8192)]
    m = aot.SegmentCostModel(shapes)
    co = m.coef["per_step", "bytes"]
    assert np.allclose([co["1"], co["B"], co["BW"]], [4e9, 2e6, 2e3], rtol=1e-6)
    assert m.fit_error() < 1e-9
    assert np.isclose(m.per_step(512, 2048).bytes, 4e9 + 2e6 * 512 + 2e3 * 512 * 2048)
    assert np.isclose(m.per_step(512, 2048).flops, 1e9 * 512)
    odd = dataclasses.replace(shapes[3], per_step=aot.StepCost(1.0, 2.0, 3.0))
    m = aot.SegmentCostModel(shapes[:3] + [odd])
    assert m.per_step(256, 8192) == aot.StepCost(1.0, 2.0, 3.0)  # compiled: its own counts
    one_batch = aot.SegmentCostModel([_segment_shape(16, 64), _segment_shape(16, 128)])
    assert one_batch.terms_used == ["1", "BW"]


def test_schedule_by_hand_all_slots():
    """2 prompts x 2 samples, responses 3, 70, 10, 40 tokens, prompts of 5, segments of 32:
    all four decode at W = bucket(5 + 33, 64) = 64 for 32 steps (rows 0 and 2 end); rows 1 and 3
    (37 filled slots) go on at B = 2, W = bucket(37 + 33) = 128 (row 3 ends at 40); row 1 (69
    filled, 6 to go) alone at B = 1 for its last 6 steps."""
    S = aot.Segment
    got = aot.engine_schedule([5, 5], [3, 70, 10, 40], 2, segment_len=32)
    assert got == [S(4, 64, 4, 32, 4, 2, False), S(2, 128, 2, 32, 0, 0, True),
                   S(1, 128, 1, 6, 0, 0, True)]
    assert sum(s.steps for s in got) == 70


def test_schedule_by_hand_with_refills():
    """The same rows in 2 slots, prompts of 5 and 9: rows 0, 1 start; row 0 ends, row 2 takes its
    slot (window 128 as row 1 has 37 filled); row 2 ends, row 3 comes in without a rearrange (same
    shape, live rows already first); row 1 ends, row 3 finishes alone at B = 1."""
    S = aot.Segment
    got = aot.engine_schedule([5, 9], [3, 70, 10, 40], 2, slots=2, segment_len=32)
    assert got == [S(2, 64, 2, 32, 2, 1, False), S(2, 128, 2, 32, 1, 1, True),
                   S(2, 128, 2, 32, 1, 1, False), S(1, 128, 1, 8, 0, 0, True)]


def test_schedule_ragged_reads_by_hand():
    """The ragged kernel's reads, 2 prompts of 5 x 1 sample, responses 3 and 20, blocks of 8: the
    window cap is 5 + 20 + 1 rounded up to 8 = 32, one segment of 20 steps. At step t row 0 reads
    slots 0..5+min(t, 3) (it stops growing when done, 3 tokens), row 1 slots 0..5+t, each rounded
    up to 8: row 0 8 x 3 + 16 x 17 = 296; row 1 (6..25 slots) 8 x 3 + 16 x 8 + 24 x 8 + 32 = 376;
    (296 + 376) / 20 = 33.6 slots per step, against 2 x 32 = 64 for the dense window."""
    got = aot.engine_schedule([5, 5], [3, 20], 1, segment_len=32, ragged_block=8)
    assert [(s.batch, s.window, s.steps) for s in got] == [(2, 32, 20)]
    assert got[0].read_slots == pytest.approx(33.6)
    dense = aot.engine_schedule([5, 5], [3, 20], 1, segment_len=32)
    assert dense[0].window == 64 and dense[0].read_slots == 0.0   # cap rounded up to 64


@pytest.mark.parametrize("slots", [0, 5, 16])
def test_schedule_is_what_engine_run_does(monkeypatch, slots):
    """engine.run with its device programs replaced by host stand-ins that decode each row to its
    given length: the (B, W, live rows, steps) of every segment it runs = engine_schedule's."""
    from relift_jax import engine
    rng = np.random.default_rng(0)
    G, prompts = 4, [[1] * int(n) for n in rng.integers(3, 40, size=6)]
    lens = [int(x) for x in rng.integers(1, 150, size=len(prompts) * G)]
    calls = []

    def state(batch, window, len_B, gen_B, row_B, done_B):
        return ({"k": np.zeros((1, batch, 1, window, 1))}, np.zeros((batch, 1)),
                np.asarray(len_B), np.asarray(gen_B), np.asarray(row_B), np.asarray(done_B))

    def empty(config, batch, window, put):
        return state(batch, window, np.zeros(batch, int), np.zeros(batch, int),
                     np.full(batch, -1), np.ones(batch, bool))

    def rearrange(batch, window, st, src):
        src = np.asarray(src)
        keep, s = src >= 0, np.maximum(src, 0)
        return state(batch, window, *(np.where(keep, np.asarray(x)[s], fill) for x, fill in
                                      zip(st[2:], (0, 0, -1, True))))

    def start_rows(config, params, st, prompts_, distinct, prompt_of, incoming, dst, put):
        len_B, gen_B, row_B, done_B = (np.array(x) for x in st[2:])
        for j, r in zip(dst, incoming):
            len_B[j], gen_B[j], row_B[j], done_B[j] = len(prompts_[prompt_of[r]]), 0, r, False
        return state(len(row_B), st[0]["k"].shape[3], len_B, gen_B, row_B, done_B)

    def segment(config, sp, steps, params, st, key):
        len_B, gen_B, row_B, done_B = (np.array(x) for x in st[2:])
        B = len(row_B)
        toks = np.full((B, steps), -1)
        live, t = int((~done_B).sum()), 0
        while t < steps and not done_B.all():
            for b in np.flatnonzero(~done_B):
                toks[b, t] = 7
                gen_B[b] += 1
                len_B[b] += 1
                done_B[b] = gen_B[b] >= lens[row_B[b]]
            t += 1
        calls.append((B, st[0]["k"].shape[3], live, t))
        return state(B, st[0]["k"].shape[3], len_B, gen_B, row_B, done_B), toks, np.zeros(
            (B, steps))
    for name, fn in (("_empty_state", empty), ("_rearrange", rearrange),
                     ("_start_rows", start_rows), ("_segment", segment)):
        monkeypatch.setattr(engine, name, fn)
    # max_new_tokens 150: the window's cap (longest prompt + 151, to 64) is reached
    sp = types.SimpleNamespace(stop_ids=(), max_new_tokens=150)
    tokens, _, _ = engine.run(None, None, prompts, sp, seed=0, num_samples=G, slots=slots,
                              segment_len=16)
    assert [len(t) for t in tokens] == lens
    want = aot.engine_schedule([len(p) for p in prompts], lens, G, slots=slots, segment_len=16,
                               max_new_tokens=150)
    cap = -(-(max(len(p) for p in prompts) + 151) // 64) * 64
    assert want[-1].window == cap != 1 << (cap - 1).bit_length()
    assert calls == [(s.batch, s.window, s.live, s.steps) for s in want]


def test_response_lengths():
    lens = aot.response_lengths(1024, 3500, 8192, "exponential")
    assert len(lens) == 1024 and lens == sorted(lens, reverse=True)
    assert abs(np.mean(lens) - 3500) < 1 and max(lens) == 8192 and min(lens) >= 1
    assert 50 < sum(x == 8192 for x in lens) < 200   # the exponential's tail, cut at the cap
    assert aot.response_lengths(16, 24, 24) == [24] * 16
    assert aot.response_lengths(5, 10, 30, "cliff") == aot._lengths(5, 10, 30)


def test_sampling_estimate_by_hand():
    """Two segments at compiled shapes, on a made-up chip: 1 GB/s HBM, so 1 MB is 1 ms."""
    chip = aot.Chip("test", 1e12, 1e15, 1e9, 2e9, 1, "")
    shapes = [aot.SegmentShape(4, 64, 32, aot.StepCost(0.0, 1e6, 0.0), aot.StepCost(0.0, 2e6, 0.0)),
              aot.SegmentShape(2, 128, 32, aot.StepCost(0.0, 5e5, 1e6), aot.StepCost())]
    segs = [aot.Segment(4, 64, 4, 32, 4, 2, False), aot.Segment(2, 128, 2, 10, 0, 0, True)]
    est = aot.estimate_sampling(segs, aot.SegmentCostModel(shapes), chip, cache_slot_bytes=100.0,
                                prefill=aot.StepCost(0.0, 3e6, 0.0), prefill_distinct=2,
                                prompt_bucket=16, weight_bytes=1e6)
    # 32 x 1 ms + 2 ms; 10 steps x max(0.5 ms HBM, 1 ms ICI) (the ICI: 1 MB over 1 GB/s in)
    assert np.allclose(est.seconds, [0.034, 0.010])
    assert np.allclose(est.prefill_s, [0.003 + 2 * 4 * 16 * 100 / 1e9, 0.0])
    assert np.allclose(est.rearrange_s, [0.0, 2 * 2 * 128 * 100 / 1e9])
    assert est.bounds == ["HBM", "ICI"] and est.exact == [True, True]
    assert np.isclose(est.total, 0.034 + 0.010 + est.prefill_s[0] + est.rearrange_s[1])
    # The ragged kernel: a step's K/V bytes are its read slots' (100 of 4 x 64), not the window's.
    segs[0] = dataclasses.replace(segs[0], read_slots=100.0)
    est = aot.estimate_sampling(segs, aot.SegmentCostModel(shapes), chip, cache_slot_bytes=100.0,
                                ragged=True)
    assert np.isclose(est.seconds[0], 0.002 + 32 * (1e6 - (4 * 64 - 100) * 100) / 1e9)


def test_scatter_writes_in_place():
    """A KV-cache write where each row has its own slot is a scatter: like an in-place dynamic
    update it counts its indices and updates, not the whole cache (fused or not)."""
    text = """HloModule m, num_partitions=1

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %r = f32[] add(%a, %b)
}

%fused (p0: f32[1000,64], p1: s32[8,1], p2: f32[8,64]) -> f32[1000,64] {
  %p0 = f32[1000,64]{1,0} parameter(0)
  %p1 = s32[8,1]{1,0} parameter(1)
  %p2 = f32[8,64]{1,0} parameter(2)
  ROOT %s = f32[1000,64]{1,0} scatter(%p0, %p1, %p2), {dims}, to_apply=%add
}

ENTRY %main (c: f32[1000,64], i: s32[8,1], u: f32[8,64]) -> (f32[1000,64], f32[1000,64]) {
  %c = f32[1000,64]{1,0} parameter(0)
  %i = s32[8,1]{1,0} parameter(1)
  %u = f32[8,64]{1,0} parameter(2)
  %f = f32[1000,64]{1,0} fusion(%c, %i, %u), kind=kCustom, calls=%fused
  %s2 = f32[1000,64]{1,0} scatter(%f, %i, %u), {dims}, to_apply=%add
  ROOT %t = (f32[1000,64]{1,0}, f32[1000,64]{1,0}) tuple(%f, %s2)
}
""".replace("{dims}", "update_window_dims={1}, inserted_window_dims={0}, "
            "scatter_dims_to_operand_dims={0}, index_vector_dim=1")
    update, indices = 8 * 64 * 4, 8 * 4
    assert hlo_cost.analyse(text).bytes == 2 * (indices + 2 * update)
