"""FLOPs, HBM bytes and collectives of a compiled XLA program, counted through its loops.

`compiled.cost_analysis()` counts the body of a while loop ONCE, so a scan over 28 layers inside a
scan over 16 micro-batches is undercounted 448 times. This module reads the compiled HLO text
(`compiled.as_text()`), finds every while loop and its trip count, and multiplies:

- trip count: XLA's `known_trip_count` when annotated; else read off the loop: the condition
  compares a tuple element `i` with a constant N (`i < N`), the body adds a constant step to `i`,
  and the loop's initial tuple holds a constant start. The outermost loop that does not fit this
  pattern (the sampler's decode loop stops when every row is done) takes `unknown_trips`, given by
  the caller; any other one (a fori_loop whose bound depends on an outer loop's index) counts one
  trip and is listed, so its contents are a lower bound.
- FLOPs: 2 x output elements x contracted size for every dot and convolution (also inside fusions);
  elementwise work is not counted (it does not run on the matrix units).
- HBM bytes: operands + output of every top-level instruction (a fusion is one instruction). A
  dynamic slice or gather of an operand counts the slice, the base of an in-place dynamic update
  or (single-operand) scatter counts nothing and its output only the update (a KV-cache write is
  not the whole cache, also when each row writes its own slot), as XLA's own cost analysis does.
  Layout padding (tiles) is not counted. A Pallas kernel counts the bytes of its own cost
  estimate where it gives one (the ragged decode attention reads one layer of the cache it gets
  whole), else its operands and output.
- collectives (all-gather, all-reduce, reduce-scatter, all-to-all, collective-permute; sync or
  async): the bytes a device receives: all-gather (n-1) x operand, reduce-scatter and all-to-all
  (n-1)/n x operand, all-reduce 2 (n-1)/n x operand, collective-permute the operand.

All counts are per device (an SPMD program is the program of one device).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Iterable

import numpy as np

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4,
                "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8,
                "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e4m3fnuz": 1,
                "f8e5m2fnuz": 1, "f8e4m3b11fnuz": 1, "f8e3m4": 1, "f4e2m1fn": 0.5}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
               "ragged-all-to-all")
# No work of their own (their operands are counted where they are made or used).
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
         "partition-id", "replica-id", "opt-barrier", "add-dependency", "domain", "async-done",
         "async-update", "copy-done", "send-done", "recv-done", "all-gather-done",
         "all-reduce-done", "collective-permute-done", "get-dimension-size"}


# Compiler bookkeeping custom calls: no data moves.
_NO_TRAFFIC_CALLS = {"AllocateBuffer", "AssumeGatherIndicesInBound", "GatherScatterIndicesBitpacked"}


def shape_bytes(shape: str) -> float:
    """Bytes of an HLO shape string (a tuple counts all its arrays; layouts are ignored)."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape):
        if dtype in _DTYPE_BYTES:
            total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def shape_dims(shape: str) -> list[int]:
    m = _ARRAY.search(shape)
    return [int(d) for d in m.group(2).split(",") if d] if m else []


def _short(shape: str) -> str:
    """`bf16[28,3584]{1,0:T(8,128)}` -> `bf16[28,3584]` (tuples: each array)."""
    arrays = [f"{t}[{d}]" for t, d in _ARRAY.findall(shape) if t in _DTYPE_BYTES]
    return arrays[0] if len(arrays) == 1 else "(" + ", ".join(arrays) + ")"


# ----------------------------------------------------------------------------- parsing

@dataclasses.dataclass
class Instr:
    name: str
    shape: str
    op: str
    operands: list[str]
    args: str       # the text between the opcode's parentheses (a constant's value)
    attrs: str
    root: bool = False


@dataclasses.dataclass
class Computation:
    name: str
    instrs: list[Instr]
    by_name: dict[str, Instr]
    params: dict[int, str]  # parameter number -> instruction name

    @property
    def root(self) -> Instr:
        return next((i for i in self.instrs if i.root), self.instrs[-1])

    def users(self, name: str) -> list[Instr]:
        return [i for i in self.instrs if name in i.operands]


@dataclasses.dataclass
class Module:
    comps: dict[str, Computation]
    entry: str
    num_partitions: int
    frames: dict[int, str] = dataclasses.field(default_factory=dict)  # stack frame -> file:line


def _source_frames(tables: dict[str, list[str]]) -> dict[int, str]:
    """Stack frame id -> `file.py:line (function)` from the module's FileNames, FunctionNames,
    FileLocations and StackFrames tables (the innermost frame of an instruction's metadata)."""
    def table(name: str) -> dict[int, str]:
        out = {}
        for line in tables.get(name, []):
            m = re.match(r"\s*(\d+)\s+(.*)$", line)
            if m:
                out[int(m.group(1))] = m.group(2).strip()
        return out
    files = {k: v.strip('"').rsplit("/", 1)[-1] for k, v in table("FileNames").items()}
    funcs = {k: v.strip('"') for k, v in table("FunctionNames").items()}
    locs = {}
    for k, v in table("FileLocations").items():
        f = re.search(r"file_name_id=(\d+)", v)
        fn = re.search(r"function_name_id=(\d+)", v)
        ln = re.search(r"\bline=(\d+)", v)
        if f and ln:
            locs[k] = (f"{files.get(int(f.group(1)), '?')}:{ln.group(1)}"
                       + (f" ({funcs.get(int(fn.group(1)), '?')})" if fn else ""))
    frames = {}
    for k, v in table("StackFrames").items():
        loc = re.search(r"file_location_id=(\d+)", v)
        if loc and int(loc.group(1)) in locs:
            frames[k] = locs[int(loc.group(1))]
    return frames


def _balanced(s: str, start: int) -> int:
    """Index just past the bracket group that opens at s[start]; strings are skipped (backend
    configs hold braces)."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack: list[str] = []
    i = start
    while i < len(s):
        ch = s[i]
        if ch == '"':
            i += 1
            while i < len(s) and s[i] != '"':
                i += 2 if s[i] == "\\" else 1
        elif ch in pairs:
            stack.append(pairs[ch])
        elif stack and ch == stack[-1]:
            stack.pop()
            if not stack:
                return i + 1
        i += 1
    return len(s)


_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_OPERAND = re.compile(r"%([\w.\-]+)")


def _parse_instr(line: str) -> Instr | None:
    m = _INSTR.match(line)
    if not m:
        return None
    rest = line[m.end():]
    if rest.startswith("("):
        end = _balanced(rest, 0)
    else:
        end = rest.find(" ")
    shape, rest = rest[:end], rest[end:].lstrip()
    om = re.match(r"([\w\-]+)\(", rest)
    if not om:
        return None
    close = _balanced(rest, om.end() - 1)
    args = rest[om.end():close - 1]
    return Instr(m.group(2), shape, om.group(1), _OPERAND.findall(args), args, rest[close:],
                 bool(m.group(1)))


def _logical_lines(text: str) -> Iterable[str]:
    """Lines, with an instruction's continuation lines (a kernel's multi-line metadata) joined."""
    pending = None
    for line in text.splitlines():
        starts = bool(_INSTR.match(line)) or bool(_HEADER.match(line)) or line.strip() == "}" \
            or not line.strip()
        if pending is not None and not starts and _INSTR.match(pending):
            pending += " " + line.strip()
            continue
        if pending is not None:
            yield pending
        pending = line
    if pending is not None:
        yield pending


def parse(text: str) -> Module:
    comps: dict[str, Computation] = {}
    entry = ""
    cur: Computation | None = None
    m = re.search(r"num_partitions=(\d+)", text)
    num_partitions = int(m.group(1)) if m else 1
    tables: dict[str, list[str]] = {}
    section = None
    for line in _logical_lines(text):
        if cur is None:
            h = _HEADER.match(line)
            if h:
                cur = Computation(h.group(2), [], {}, {})
                if h.group(1):
                    entry = h.group(2)
                section = None
            elif line.strip() in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
                section = line.strip()
            elif section and line.strip():
                tables.setdefault(section, []).append(line)
            continue
        if line.strip() == "}":
            comps[cur.name] = cur
            cur = None
            continue
        ins = _parse_instr(line)
        if ins is None:
            continue
        cur.instrs.append(ins)
        cur.by_name[ins.name] = ins
        if ins.op == "parameter" and ins.args.strip().isdigit():
            cur.params[int(ins.args)] = ins.name
    return Module(comps, entry, num_partitions, _source_frames(tables))


def _attr(ins: Instr, key: str) -> str | None:
    m = re.search(rf"\b{key}=%?([\w.\-]+)", ins.attrs)
    return m.group(1) if m else None


def _called(ins: Instr) -> list[str]:
    names = []
    for key in ("calls", "to_apply", "true_computation", "false_computation"):
        v = _attr(ins, key)
        if v:
            names.append(v)
    m = re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)
    if m:
        names += _OPERAND.findall(m.group(1))
    m = re.search(r"called_computations=\{([^}]*)\}", ins.attrs)
    if m:
        names += _OPERAND.findall(m.group(1))
    return names


# ----------------------------------------------------------------------------- trip counts

def _through(comp: Computation, name: str) -> Instr | None:
    """The instruction behind `name`, looking through copies, converts and bitcasts."""
    ins = comp.by_name.get(name)
    while ins is not None and ins.op in ("copy", "convert", "bitcast", "reshape") and ins.operands:
        ins = comp.by_name.get(ins.operands[0])
    return ins


def _constant(comp: Computation, name: str) -> int | None:
    """The integer value of a scalar constant (through copies), else None."""
    ins = _through(comp, name)
    if ins is None or ins.op != "constant":
        return None
    m = re.fullmatch(r"\s*(-?\d+)\s*", ins.args)
    return int(m.group(1)) if m else None


def _tuple_index(comp: Computation, name: str) -> int | None:
    """k when `name` is get-tuple-element(parameter, index=k), through copies."""
    ins = _through(comp, name)
    if ins is None or ins.op != "get-tuple-element":
        return None
    src = comp.by_name.get(ins.operands[0]) if ins.operands else None
    if src is None or src.op != "parameter":
        return None
    m = re.search(r"index=(\d+)", ins.attrs)
    return int(m.group(1)) if m else None


def _compare_in(mod: Module, comp: Computation, ins: Instr, depth: int = 0
                ) -> tuple[str, int, int] | None:
    """("gte", tuple index k, bound N) for a loop condition `gte(param, k) < N` (or `N > ...`),
    looking into a fused condition; ("param", i, N) while inside the fusion, the compare's left
    side being the fusion's i-th parameter."""
    if ins.op == "fusion" and depth < 3:
        inner = mod.comps.get(_attr(ins, "calls") or "")
        if inner is None:
            return None
        got = _compare_in(mod, inner, inner.root, depth + 1)
        if got is None:
            return None
        # inner indices refer to the fusion's parameters: map back to the outer operands
        kind, which, bound = got
        if kind == "param":
            outer = ins.operands[which]
            k = _tuple_index(comp, outer)
            return ("gte", k, bound) if k is not None else None
        return got
    if ins.op != "compare" or len(ins.operands) != 2:
        return None
    d = re.search(r"direction=(\w+)", ins.attrs)
    a, b = ins.operands
    if d and d.group(1) == "GT":
        a, b = b, a
    elif not d or d.group(1) != "LT":
        return None
    bound = _constant(comp, b)
    if bound is None:
        return None
    k = _tuple_index(comp, a)
    if k is not None:
        return ("gte", k, bound)
    src = _through(comp, a)
    if src is not None and src.op == "parameter":
        num = next((n for n, pname in comp.params.items() if pname == src.name), None)
        if num is not None:
            return ("param", num, bound)
    return None


def trip_count(mod: Module, caller: Computation, loop: Instr) -> int | None:
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', loop.attrs)
    if m:
        return int(m.group(1))
    cond, body = mod.comps.get(_attr(loop, "condition") or ""), mod.comps.get(_attr(loop, "body")
                                                                              or "")
    if cond is None or body is None:
        return None
    got = _compare_in(mod, cond, cond.root)
    if got is None or got[0] != "gte":
        return None
    _, k, bound = got
    # the step: body's root tuple element k = add(gte(param, k), constant)
    step = None
    root = body.root
    if root.op == "tuple" and k < len(root.operands):
        upd = _through(body, root.operands[k])
        if upd is not None and upd.op == "add" and len(upd.operands) == 2:
            x, y = upd.operands
            if _tuple_index(body, x) == k:
                step = _constant(body, y)
            elif _tuple_index(body, y) == k:
                step = _constant(body, x)
    if not step or step <= 0:
        return None
    # the start: the loop's initial tuple element k
    start = 0
    init = caller.by_name.get(loop.operands[0]) if loop.operands else None
    if init is not None and init.op == "tuple" and k < len(init.operands):
        c = _constant(caller, init.operands[k])
        if c is None:
            return None
        start = c
    return max(0, -(-(bound - start) // step))


# ----------------------------------------------------------------------------- costs

@dataclasses.dataclass
class Collective:
    op: str
    shape: str       # operand shape
    group: int       # devices per replica group
    count: float     # executions per call (through loops)
    bytes: float     # bytes received per device, all executions
    loops: tuple     # ids of the loops around it, outermost first


@dataclasses.dataclass
class Loop:
    id: int
    kind: str        # the body computation's name
    trips: int
    known: bool      # False: the caller's assumption (data-dependent stop)
    depth: int
    parent: int | None
    mult: float      # how often the loop runs per call
    source: str = ""  # where in the Python source the loop was made (`attention.py:80 (f)`)


@dataclasses.dataclass
class Cost:
    flops: float = 0.0
    bytes: float = 0.0
    flops_once: float = 0.0   # with every trip count 1 (what cost_analysis() counts)
    bytes_once: float = 0.0
    collectives: list[Collective] = dataclasses.field(default_factory=list)
    loops: list[Loop] = dataclasses.field(default_factory=list)
    custom_calls: float = 0   # executions of kernels whose FLOPs are unknown (Pallas, no estimate)
    kernel_calls: float = 0   # executions of Pallas/Mosaic TPU kernels (tpu_custom_call)
    unknown_loop: int | None = None

    @property
    def counted_once(self) -> list[Loop]:
        """Loops with a data-dependent trip count that no assumption covers: counted as one trip,
        so the FLOPs and bytes inside them are lower bounds."""
        return [lp for lp in self.loops if not lp.known and lp.id != self.unknown_loop]

    @property
    def ici_bytes(self) -> float:
        return sum(c.bytes for c in self.collectives)

    def collectives_in(self, loop_id: int | None, per_trip: bool = False) -> list[Collective]:
        """Collectives nested (at any depth) in a loop, summed by (op, shape, group); per trip of
        that loop when `per_trip`."""
        if loop_id is None:
            return []
        lp = next(l for l in self.loops if l.id == loop_id)
        div = lp.mult * lp.trips if per_trip else 1.0
        agg: dict[tuple, Collective] = {}
        for c in self.collectives:
            if loop_id in c.loops:
                key = (c.op, c.shape, c.group)
                a = agg.setdefault(key, Collective(c.op, c.shape, c.group, 0.0, 0.0, ()))
                a.count += c.count / div
                a.bytes += c.bytes / div
        return sorted(agg.values(), key=lambda c: -c.bytes)


def _group_size(ins: Instr, num_partitions: int) -> int:
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", ins.attrs)
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=\{\{([^}]*)\}", ins.attrs)
    if m:
        return len([x for x in m.group(1).split(",") if x.strip()])
    return num_partitions


def _received(op: str, operand_bytes: float, n: int) -> float:
    if op == "all-gather":
        return (n - 1) * operand_bytes
    if op == "all-reduce":
        return 2 * (n - 1) / n * operand_bytes
    if op in ("reduce-scatter", "all-to-all", "ragged-all-to-all"):
        return (n - 1) / n * operand_bytes
    return operand_bytes  # collective-permute


def _dot_flops(comp: Computation, ins: Instr, mod: Module) -> float:
    if ins.op == "dot":
        out = math.prod(shape_dims(ins.shape))
        lhs = shape_dims(_shape_of(mod, comp, ins.operands[0]))
        m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
        k = math.prod(lhs[int(d)] for d in m.group(1).split(",") if d) if m and lhs else 1
        return 2.0 * out * k
    return _conv_flops(comp, ins, mod)


def _window(attrs: str, key: str, n: int, default: int) -> list[int]:
    m = re.search(rf"\b{key}=([\dx_]+)", attrs)
    if not m:
        return [default] * n
    return [int(v) for v in m.group(1).split("x")]


def _conv_flops(comp: Computation, ins: Instr, mod: Module) -> float:
    """2 x fused multiply-adds of a convolution, as XLA's HloCostAnalysis counts them: per spatial
    dimension only the (output, kernel) position pairs that land on an input element (not on
    padding or a dilation hole). TPU compilers write batched matmuls as such convolutions."""
    lhs = shape_dims(_shape_of(mod, comp, ins.operands[0]))
    rhs = shape_dims(_shape_of(mod, comp, ins.operands[1]))
    out = shape_dims(ins.shape)
    m = re.search(r"dim_labels=([0-9a-z]+)_([0-9a-z]+)->([0-9a-z]+)", ins.attrs)
    if not (m and lhs and rhs and out):
        return 0.0
    ll, rl, ol = m.groups()
    spatial = sorted(ch for ch in ll if ch.isdigit())
    n = len(spatial)
    size = _window(ins.attrs, "size", n, 1)
    stride = _window(ins.attrs, "stride", n, 1)
    lhs_dil = _window(ins.attrs, "lhs_dilate", n, 1)
    rhs_dil = _window(ins.attrs, "rhs_dilate", n, 1)
    pm = re.search(r"\bpad=([\d_x-]+)", ins.attrs)
    pads = [int(p.split("_")[0]) for p in pm.group(1).split("x")] if pm else [0] * n
    valid = 1
    for d, ch in enumerate(spatial):
        in_size, k_size, o_size = lhs[ll.index(ch)], rhs[rl.index(ch)], out[ol.index(ch)]
        dilated = (in_size - 1) * lhs_dil[d] + 1
        pos = (np.arange(o_size)[:, None] * stride[d] + np.arange(k_size)[None, :] * rhs_dil[d]
               - pads[d])
        valid *= int(np.count_nonzero((pos >= 0) & (pos < dilated) & (pos % lhs_dil[d] == 0)))
    g = re.search(r"feature_group_count=(\d+)", ins.attrs)
    bg = re.search(r"batch_group_count=(\d+)", ins.attrs)
    fma = (lhs[ll.index("f")] / (int(g.group(1)) if g else 1) * rhs[rl.index("o")]
           * lhs[ll.index("b")] / (int(bg.group(1)) if bg else 1) * valid)
    return 2.0 * fma


def _shape_of(mod: Module, comp: Computation, name: str) -> str:
    ins = comp.by_name.get(name)
    return ins.shape if ins is not None else ""


def _fused_flops(mod: Module, comp: Computation, seen: int = 0) -> float:
    total = 0.0
    for ins in comp.instrs:
        if ins.op in ("dot", "convolution"):
            total += _dot_flops(comp, ins, mod)
        elif ins.op == "fusion" and seen < 8:
            inner = mod.comps.get(_attr(ins, "calls") or "")
            if inner is not None:
                total += _fused_flops(mod, inner, seen + 1)
    return total


def _param_bytes(mod: Module, comp: Computation, name: str, full: float, depth: int = 0) -> float:
    """Bytes a fused computation reads of the value `name`: only the slices it takes."""
    total = 0.0
    for u in comp.users(name):
        if u.op in ("dynamic-slice", "slice", "gather") and u.operands[0] == name:
            total += shape_bytes(u.shape)
        elif u.op in ("dynamic-update-slice", "scatter") and u.operands[0] == name:
            continue  # in place: the base is not read
        elif u.op == "bitcast" and depth < 8:
            total += _param_bytes(mod, comp, u.name, full, depth + 1)
        elif u.op == "fusion" and depth < 8:
            inner = mod.comps.get(_attr(u, "calls") or "")
            if inner is None:
                return full
            for j, opnd in enumerate(u.operands):
                if opnd == name and j in inner.params:
                    total += _param_bytes(mod, inner, inner.params[j], full, depth + 1)
        else:
            return full
    return min(total, full)


def _output_bytes(mod: Module, comp: Computation, ins: Instr, depth: int = 0) -> float:
    """Bytes a fused computation writes: an in-place dynamic-update-slice writes its update."""
    if ins.op == "dynamic-update-slice" and len(ins.operands) > 1:
        return shape_bytes(_shape_of(mod, comp, ins.operands[1]))
    if ins.op == "scatter" and len(ins.operands) == 3:  # in place: writes its updates
        return shape_bytes(_shape_of(mod, comp, ins.operands[2]))
    if ins.op == "tuple" and depth < 8:
        return sum(_output_bytes(mod, comp, comp.by_name[o], depth + 1)
                   for o in ins.operands if o in comp.by_name)
    if ins.op == "bitcast" and ins.operands and ins.operands[0] in comp.by_name and depth < 8:
        return _output_bytes(mod, comp, comp.by_name[ins.operands[0]], depth + 1)
    if ins.op == "fusion" and depth < 8:
        inner = mod.comps.get(_attr(ins, "calls") or "")
        if inner is not None:
            return _output_bytes(mod, inner, inner.root, depth + 1)
    return shape_bytes(ins.shape)


class _Walker:
    def __init__(self, mod: Module, unknown_trips: int | None):
        self.mod, self.unknown_trips = mod, unknown_trips
        self.cost = Cost()

    def walk(self, comp: Computation, mult: float, loops: tuple, depth: int = 0) -> None:
        for ins in comp.instrs:
            self.instr(comp, ins, mult, loops, depth)

    def add(self, flops: float, nbytes: float, mult: float) -> None:
        c = self.cost
        c.flops += mult * flops
        c.bytes += mult * nbytes
        c.flops_once += flops
        c.bytes_once += nbytes

    def instr(self, comp: Computation, ins: Instr, mult: float, loops: tuple, depth: int) -> None:
        mod, op = self.mod, ins.op
        base = op[:-len("-start")] if op.endswith("-start") else op
        if op in _FREE:
            return
        if op == "while":
            trips = trip_count(mod, comp, ins)
            known = trips is not None
            assumed = not known and not loops and self.unknown_trips is not None \
                and self.cost.unknown_loop is None
            if not known:
                trips = self.unknown_trips if assumed else 1
            frame = re.search(r"stack_frame_id=(\d+)", ins.attrs)
            lp = Loop(len(self.cost.loops), _attr(ins, "body") or "?", trips, known,
                      len(loops), loops[-1] if loops else None, mult,
                      mod.frames.get(int(frame.group(1)), "") if frame else "")
            self.cost.loops.append(lp)
            if assumed:
                self.cost.unknown_loop = lp.id
            body = mod.comps.get(_attr(ins, "body") or "")
            if body is not None:
                self.walk(body, mult * trips, loops + (lp.id,), depth + 1)
            return
        if op in ("call", "async-start"):
            for name in _called(ins):
                if name in mod.comps:
                    self.walk(mod.comps[name], mult, loops, depth + 1)
            return
        if op == "conditional":  # the costliest branch
            best = None
            for name in _called(ins):
                if name in mod.comps:
                    sub = _Walker(mod, self.unknown_trips)
                    sub.walk(mod.comps[name], mult, loops, depth + 1)
                    if best is None or sub.cost.flops > best.cost.flops:
                        best = sub
            if best is not None:
                self._merge(best.cost)
            return
        operands = [_shape_of(mod, comp, o) for o in ins.operands]
        if base in COLLECTIVES:
            n = _group_size(ins, mod.num_partitions)
            ob = sum(shape_bytes(s) for s in operands)
            got = _received(base, ob, n)
            self.cost.collectives.append(Collective(base, _short(" ".join(operands)), n, mult,
                                                    mult * got, loops))
            self.add(0.0, ob + (n * ob if base == "all-gather" else ob), mult)
            return
        if op == "fusion":
            inner = mod.comps.get(_attr(ins, "calls") or "")
            if inner is None:
                self.add(0.0, sum(map(shape_bytes, operands)) + shape_bytes(ins.shape), mult)
                return
            nbytes = _output_bytes(mod, inner, inner.root)
            for j, opnd in enumerate(ins.operands):
                full = shape_bytes(operands[j])
                nbytes += (_param_bytes(mod, inner, inner.params[j], full)
                           if j in inner.params else full)
            self.add(_fused_flops(mod, inner), nbytes, mult)
            return
        flops = _dot_flops(comp, ins, mod) if op in ("dot", "convolution") else 0.0
        estimated_bytes = None
        if op == "custom-call":
            target = re.search(r'custom_call_target="([^"]*)"', ins.attrs)
            target = target.group(1) if target else ""
            if target in _NO_TRAFFIC_CALLS:
                return
            if target == "tpu_custom_call":  # a Pallas/Mosaic kernel: its own cost estimate
                self.cost.kernel_calls += mult
                est = re.search(r'\\?"flops\\?"\s*:\s*\\?"?(\d+)', ins.attrs)
                if est:
                    flops = float(est.group(1))
                else:
                    self.cost.custom_calls += mult
                # A kernel that reads part of an operand in place (the ragged decode attention
                # reads one layer of the whole cache) says what it moves.
                est = re.search(r'\\?"bytes_accessed\\?"\s*:\s*\\?"?(\d+)', ins.attrs)
                if est:
                    estimated_bytes = float(est.group(1))
        if estimated_bytes is not None:
            nbytes = estimated_bytes
        elif op == "dynamic-update-slice" and len(operands) > 1:
            nbytes = 2 * shape_bytes(operands[1])
        elif op == "scatter" and len(operands) == 3:  # in place: indices, updates read and written
            nbytes = shape_bytes(operands[1]) + 2 * shape_bytes(operands[2])
        elif op in ("dynamic-slice", "slice"):
            nbytes = 2 * shape_bytes(ins.shape)
        else:
            nbytes = sum(map(shape_bytes, operands)) + shape_bytes(ins.shape)
        self.add(flops, nbytes, mult)

    def _merge(self, other: Cost) -> None:
        c = self.cost
        offset = len(c.loops)
        for lp in other.loops:
            c.loops.append(dataclasses.replace(
                lp, id=lp.id + offset, parent=None if lp.parent is None else lp.parent + offset))
        for col in other.collectives:
            c.collectives.append(dataclasses.replace(col, loops=tuple(i + offset
                                                                      for i in col.loops)))
        c.flops += other.flops
        c.bytes += other.bytes
        c.flops_once += other.flops_once
        c.bytes_once += other.bytes_once
        c.custom_calls += other.custom_calls
        c.kernel_calls += other.kernel_calls


def analyse(text: str, unknown_trips: int | None = None) -> Cost:
    """The loop-aware cost of a compiled program's HLO text (see the module docstring).

    unknown_trips: trip count of the outermost loop whose count is data-dependent (the decode
      loop); any other such loop counts one trip and is listed in `Cost.counted_once`.
    """
    mod = parse(text)
    w = _Walker(mod, unknown_trips)
    w.walk(mod.comps[mod.entry], 1.0, ())
    return w.cost


def describe_loops(cost: Cost) -> Iterable[str]:
    """One line per outermost loop: its trips and, nested, its children's (`8w`: one of XLA's
    windowed einsums, an all-gather and matmul in 8 chunks; `1?`: a data-dependent count taken
    as 1)."""
    def tree(lp: Loop) -> str:
        kids = [tree(k) for k in cost.loops if k.parent == lp.id]
        s = f"{lp.trips}{'' if lp.known else ' (assumed)' if lp.id == cost.unknown_loop else '?'}"
        if "windowed_dot_general" in lp.kind:  # XLA's collective matmul: a gather in chunks
            s += "w"
        return s + (" x [" + ", ".join(kids) + "]" if kids else "")
    for lp in cost.loops:
        if lp.parent is None:
            yield tree(lp)
