"""Device meshes, logical axis rules and shardings for data-parallel and FSDP training.

The mesh has two axes, ('data', 'fsdp'). The batch is split over both; parameters, optimizer
state and EMAs are split over 'fsdp' along the weight axis the backbones name 'embed_out' (ZeRO-3
style) and replicated over 'data'. With fsdp = 1 (the default) this is plain data parallelism.
Meshes use `AxisType.Auto` so XLA's partitioner propagates the shardings (the jax default, Explicit,
breaks ordinary FSDP code).
Multi-host: each process contributes its rows of the global batch through
`jax.make_array_from_process_local_data`.

Backbones name their axes with the vocabulary below (`nn.with_logical_partitioning` on weights,
`nn.with_logical_constraint` on activations); `config.mesh.rules` maps names to mesh axes.
"""
import contextlib

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from scm_jax.errors import ConfigError

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
MESH_AXES = (DATA_AXIS, FSDP_AXIS)
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)

# Logical axis names the backbones put on their weights (nn.with_logical_partitioning) and
# activations (nn.with_logical_constraint). Mesh rules map them to mesh axes; an axis not
# named by the rules is replicated.
WEIGHT_AXES = (
    "conv_height", "conv_width",  # spatial taps of a conv kernel
    "embed_in",                   # input features of a Dense/Conv kernel
    "embed_out",                  # output features of a Dense/Conv kernel (FSDP shards this)
    "vocab",                      # rows of an embedding table (class labels)
    "norm",                       # per-channel vectors: biases, norm scales, gains
)
ACTIVATION_AXES = ("batch", "height", "width", "length", "channels", "heads", "head_dim")

DEFAULT_RULES = (("batch", BATCH_AXES), ("embed_out", FSDP_AXIS))


def make_mesh(mesh_config, devices=None) -> Mesh:
    """A ('data', 'fsdp') mesh; `mesh_config.data = -1` takes all devices left after fsdp."""
    devices = list(jax.devices() if devices is None else devices)
    fsdp = int(mesh_config.get("fsdp", 1))
    if fsdp < 1 or len(devices) % fsdp:
        raise ConfigError(f"config.mesh.fsdp = {fsdp} must be >= 1 and divide the "
                         f"{len(devices)} visible devices")
    data = len(devices) // fsdp if mesh_config.data == -1 else mesh_config.data
    if data < 1 or data * fsdp > len(devices):
        raise ConfigError(f"config.mesh.data = {mesh_config.data} with fsdp = {fsdp} needs "
                         f"{data * fsdp} devices but {len(devices)} are visible")
    grid = np.asarray(devices[:data * fsdp]).reshape(data, fsdp)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 2)


def logical_rules(mesh_config) -> tuple:
    """config.mesh.rules (a sequence of (logical name, mesh axis or axes)) or the defaults."""
    rules = mesh_config.get("rules", None) or DEFAULT_RULES
    out = []
    for name, axes in rules:
        for axis in (axes,) if isinstance(axes, str) or axes is None else axes:
            if axis is not None and axis not in MESH_AXES:
                raise ConfigError(f"config.mesh.rules maps {name!r} to unknown mesh axis "
                                 f"{axis!r}; expected one of {MESH_AXES}")
        out.append((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes))
    return tuple(out)


def logical_spec(names, shape, mesh: Mesh, rules) -> P:
    """Mesh PartitionSpec for an array with logical axis `names`.

    An axis whose size the mesh axes do not divide, or whose mesh axes an earlier dimension
    already uses, stays replicated: small layers (e.g. a 4-channel output conv) simply are not
    split, instead of failing.
    """
    table = dict(rules)
    used, spec = set(), []
    for name, size in zip(names, shape):
        axes = table.get(name)
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        count = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if axes and size % count == 0:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        else:
            spec.append(None)
    return P(*spec)


def tree_shardings(boxed_tree, mesh: Mesh, rules):
    """NamedShardings for the *unboxed* form of a tree that may hold `nn.LogicallyPartitioned`
    boxes (e.g. `jax.eval_shape` of an init that used `nn.with_logical_partitioning`).
    Plain leaves are replicated."""
    def leaf(x):
        if isinstance(x, nn.LogicallyPartitioned):
            return NamedSharding(mesh, logical_spec(x.names, x.value.shape, mesh, rules))
        return NamedSharding(mesh, P())

    return jax.tree.map(leaf, boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules):
    """Context in which the backbones' `nn.with_logical_constraint` calls take effect (trace the
    jitted step inside it)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every mesh axis."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_devices(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
    n = batch_devices(mesh)
    if batch_size % n:
        raise ConfigError(f"{what} = {batch_size} is not divisible by the {n} devices of the mesh")


def shard_batch(local_batch: dict, mesh: Mesh) -> dict:
    """Host-local numpy rows -> global jax.Arrays sharded along the batch axes."""
    sharding = batch_sharded(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}


def with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs carrying shardings (restore targets that land directly sharded)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_tree, shardings)
