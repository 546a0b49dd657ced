"""GPU node topologies (`scm_jax.gpu_nodes`): names, and the target description XLA's GPU
compiler accepts (compiled deviceless for sm_90 where JAX's CUDA plugin is installed)."""
import numpy as np
import pytest

from scm_jax import gpu_nodes
from scm_jax.errors import ConfigError


@pytest.mark.parametrize("product, per_node, nodes, hbm_gib", [
    ("h100-8", 8, 1, 79.6), ("h200-8", 8, 1, 140.4), ("h100-8x4", 8, 4, 79.6), ("h200-1", 1, 1, 140.4)])
def test_topologies_parse(product, per_node, nodes, hbm_gib):
    topology = gpu_nodes.parse_gpu_topology(product)
    assert (topology.chips, topology.num_slices) == (per_node, nodes)
    assert topology.chip.hbm_bytes / gpu_nodes.GIB == pytest.approx(hbm_gib, abs=0.05)
    assert gpu_nodes.is_gpu_product(product)


@pytest.mark.parametrize("product", ["h100-3", "h100-8x3", "a100-8", "h100", "h300-8"])
def test_unknown_topologies_are_named(product):
    with pytest.raises(ConfigError, match=product):
        gpu_nodes.parse_gpu_topology(product)


def test_a_sharded_matmul_compiles_for_sm90_without_a_gpu():
    pytest.importorskip("jax_cuda12_plugin")
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    devices = gpu_nodes.gpu_devices(gpu_nodes.parse_gpu_topology("h100-8x2"))
    assert len(devices) == 16 and devices[0].platform == "gpu"
    mesh = Mesh(np.array(devices).reshape(2, 8), ("data", "fsdp"))
    a = jax.ShapeDtypeStruct((1024, 512), jnp.bfloat16,
                             sharding=NamedSharding(mesh, P(("data", "fsdp"))))
    b = jax.ShapeDtypeStruct((512, 256), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
    from scm_jax import compile_cache

    with compile_cache.without_jax_cache():   # it cannot load executables for absent devices
        compiled = jax.jit(lambda a, b: a @ b).lower(a, b).compile()
    memory = compiled.memory_analysis()
    assert memory.argument_size_in_bytes == (1024 // 16) * 512 * 2 + 512 * 256 * 2
