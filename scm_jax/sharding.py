"""Device meshes and shardings for data-parallel training.

The mesh has one axis, 'data': the batch is split along it and parameters, optimizer state and
EMAs are replicated. Meshes use `AxisType.Auto` so XLA's partitioner propagates the shardings
(DESIGN.md §3). Multi-host: each process contributes its rows of the global batch through
`jax.make_array_from_process_local_data`.
"""
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"

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


def make_mesh(mesh_config) -> Mesh:
    """A 1-D ('data',) mesh over `mesh_config.data` devices (-1: all of them)."""
    devices = jax.devices()
    n = len(devices) if mesh_config.data == -1 else mesh_config.data
    if n > len(devices):
        raise ValueError(f"config.mesh.data = {n} but only {len(devices)} devices are visible")
    return Mesh(np.asarray(devices[:n]), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over 'data'."""
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
    n = mesh.shape[DATA_AXIS]
    if batch_size % n:
        raise ValueError(f"{what} = {batch_size} is not divisible by the {n} devices of the mesh")


def shard_batch(local_batch: dict, mesh: Mesh) -> dict:
    """Host-local numpy rows -> global jax.Arrays sharded along 'data'."""
    sharding = batch_sharded(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}
