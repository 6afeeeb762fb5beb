"""Device mesh and THE table that maps logical axis names to mesh axes.

The model names logical axes only (`param_axes`, `constrain(x, ("batch", "length", "act_embed"))`);
this module alone knows the mesh. Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with
parameters and optimiser state sharded), `tensor` (Megatron-style model parallel).
Activations are constrained only when a mesh is set with `jax.set_mesh`, so the same code runs
unsharded on one device.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# ONE rules table: logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("cache_layers", None),
    ("cache_slots", None),
    ("cache_kv_heads", "tensor"),
)
_RULES = dict(LOGICAL_AXIS_RULES)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape; -1 in one axis takes all remaining devices."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        dims = [self.data, self.fsdp, self.tensor]
        if dims.count(-1) > 1:
            raise ValueError(f"MeshConfig {self}: at most one axis may be -1")
        known = int(np.prod([d for d in dims if d != -1]))
        if -1 in dims:
            if num_devices % known:
                raise ValueError(f"MeshConfig {self}: {num_devices} devices are not divisible by "
                                 f"the fixed axes' product {known}")
            dims[dims.index(-1)] = num_devices // known
        if int(np.prod(dims)) != num_devices:
            raise ValueError(f"MeshConfig {self}: data*fsdp*tensor = {int(np.prod(dims))} but "
                             f"{num_devices} devices are available")
        return tuple(dims)


def make_mesh(config: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None):
    """The (data, fsdp, tensor) mesh over `devices` (default: all), laid out along the physical
    torus by jax.make_mesh. Where a mesh axis would have to split a physical axis (on v6e-64's 8x8,
    an axis of 2 or 4), jax.make_mesh refuses; the mesh is then built with the physical axes split
    (neighbours along a mesh axis stay neighbours on the torus, the axes just share links)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = config.shape(len(devices))
    types = (AxisType.Auto,) * 3
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=types, devices=devices)
    except NotImplementedError:
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return jax.sharding.Mesh(grid, MESH_AXES, axis_types=types)


def logical_to_spec(axes: Sequence[str | None]) -> P:
    """PartitionSpec for a tuple of logical axis names (None = replicated)."""
    used: set[str] = set()
    out = []
    for name in axes:
        if name is None:
            out.append(None)
            continue
        if name not in _RULES:
            raise KeyError(f"logical axis {name!r} has no rule in LOGICAL_AXIS_RULES")
        mesh_axes = _RULES[name]
        # A mesh axis may shard only one dimension of an array.
        if isinstance(mesh_axes, str):
            mesh_axes = (mesh_axes,)
        mesh_axes = tuple(a for a in (mesh_axes or ()) if a not in used)
        used.update(mesh_axes)
        out.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*out)


def _fit(spec: P, shape: tuple[int, ...], mesh) -> P:
    """Drop mesh axes that do not divide their dimension (e.g. 2 kv heads over tensor=4)."""
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    out = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        kept = []
        for a in axes:
            if dim % (int(np.prod([sizes[k] for k in kept])) * sizes[a]) == 0:
                kept.append(a)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*out)


def named_sharding(mesh, axes: Sequence[str | None], shape: tuple[int, ...]) -> NamedSharding:
    return NamedSharding(mesh, _fit(logical_to_spec(axes), shape, mesh))


def tree_shardings(mesh, axes_tree: Any, shapes_tree: Any) -> Any:
    """NamedShardings for a pytree, given the matching trees of logical axes and shapes."""
    return jax.tree.map(lambda ax, s: named_sharding(mesh, ax, tuple(s.shape)), axes_tree,
                        shapes_tree, is_leaf=lambda x: isinstance(x, tuple))


def batch_sharding(mesh, ndim: int, shape: tuple[int, ...] | None = None) -> NamedSharding:
    axes = ("batch",) + (None,) * (ndim - 1)
    if shape is None:
        return NamedSharding(mesh, logical_to_spec(axes))
    return named_sharding(mesh, axes, shape)


def batch_divisor(mesh) -> int:
    """Batch sizes must be multiples of this to split evenly over the batch mesh axes."""
    if mesh is None:
        return 1
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    return sizes.get("data", 1) * sizes.get("fsdp", 1)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical axes; a no-op when no mesh is set (single device, tests)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, _fit(logical_to_spec(axes), x.shape, mesh))


def host_to_global(x, sharding_: NamedSharding) -> jax.Array:
    """A global array from a host numpy array that every process holds in full (multi-host safe)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding_, lambda idx: x[idx])


def global_to_host(tree: Any) -> Any:
    """Numpy copies of (possibly multi-host sharded) arrays on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)


class LockstepError(RuntimeError):
    """The processes of a multi-host run disagree on host state they must share."""


def check_same_on_every_process(what: str, value: Any) -> None:
    """Raises LockstepError on every process when the processes hold different `value`s.

    Multi-host runs drive the same controller on every process; a divergence (different buffer,
    data cursor or SFT decision) would otherwise surface as a hang in the next collective or as a
    silently wrong run. `value` is any JSON-able host state; 8 bytes of its hash are all-gathered.
    """
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils
    text = json.dumps(value, sort_keys=True, default=str).encode()
    mine = np.frombuffer(hashlib.sha256(text).digest()[:8], np.int32).copy()
    every = np.asarray(multihost_utils.process_allgather(mine))  # [processes, 2]
    differ = [i for i in range(every.shape[0]) if (every[i] != every[0]).any()]
    if differ:
        raise LockstepError(f"{what} differs between processes: process 0 and process(es) "
                            f"{differ} hold different values (this is process "
                            f"{jax.process_index()}); stopping")
