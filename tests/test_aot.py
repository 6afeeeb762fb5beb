"""relift_jax.aot and relift_jax.hlo_cost: ahead-of-time compilation for a TPU topology on this CPU.

Compiling for a topology needs libtpu (`pip install -e '.[aot]'`); those tests skip without it. The
topology names and the HLO arithmetic are checked either way where they need no compiler.
"""
from __future__ import annotations

import io
import os

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
    for name in ("init", "rl_step", "sft_step", "prefill", "decode"):
        assert f"\n{name:<9}" in text, f"{name} row missing:\n{text}"
    assert "collectives inside the decode loop, per decode step" in text
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
