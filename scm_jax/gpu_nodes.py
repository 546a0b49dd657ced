"""GPU nodes by name: GPUs per node, HBM, peak FLOP/s, bandwidths, and their devices as JAX's
CUDA plugin describes them on a host that has none.

Topologies: `h100-8` (one node of 8 H100 SXM GPUs), `h200-8`, and `h100-8x4` (4 such nodes);
GPUs per node 1, 2, 4 or 8, nodes a power of two.

Nothing is attached: `jax.experimental.topologies.get_topology_desc(platform="cuda", ...)`
takes a target description (a `GpuTargetConfigProto` in text form, written here from NVIDIA's
published figures for each GPU) and gives devices that XLA's GPU compiler compiles for, sm_90
for Hopper, with `JAX_PLATFORMS=cpu` (without it the plugin tries to open a GPU). Without a
device XLA does not autotune (GEMM tilings, fusion choices), so a program compiled here may
differ a little from one compiled on the GPU; memory figures are close, times are not given by
XLA at all (the compile check estimates them by a roofline of its own).
"""
import dataclasses
import os
import re

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str                  # as the CUDA driver reports it
    hbm_bytes: int             # device memory (JAX preallocates 75% by default: docs/paper-scale.md)
    peak_bf16_flops: float     # dense tensor-core bf16, per GPU
    hbm_bytes_per_s: float
    nvlink_bytes_per_s: float  # per GPU, one direction, within a node
    network_bytes_per_s: float  # per GPU, between nodes (one 400 Gb/s NIC per GPU)
    sm_count: int
    clock_ghz: float
    l2_bytes: int
    compute_capability: tuple = (9, 0)


# NVIDIA's data sheets (H100 SXM5 80GB, H200 SXM 141GB): 989 TFLOP/s dense bf16; HBM3 3.35
# TB/s, HBM3e 4.8 TB/s; NVLink 4 900 GB/s both directions; memory as nvidia-smi reports it.
GPUS = {
    "h100": Gpu("NVIDIA H100 80GB HBM3", 81559 * 2 ** 20, 989e12, 3.35e12, 450e9, 50e9,
                132, 1.98, 50 * 2 ** 20),
    "h200": Gpu("NVIDIA H200", 143771 * 2 ** 20, 989e12, 4.8e12, 450e9, 50e9, 132, 1.98,
                50 * 2 ** 20),
}
_GPUS_PER_NODE = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class GpuTopology:
    """`chips` GPUs per node, `num_slices` nodes (the compile check's mesh: FSDP over a node's
    GPUs, data parallel across nodes, as for TPU slices)."""
    product: str               # e.g. 'h100-8x4'
    chip: Gpu
    chips: int                 # GPUs per node
    num_slices: int = 1        # nodes
    platform: str = "gpu"

    @property
    def name(self) -> str:
        return f"cuda:{self.chip.name}:1x{self.num_slices}x{self.chips}"

    @property
    def available_bytes(self) -> int:
        """Device memory a JAX program may use per GPU: the fraction JAX's allocator takes
        (`XLA_PYTHON_CLIENT_MEM_FRACTION`, 0.75 by default, with or without preallocation)."""
        return int(self.chip.hbm_bytes * memory_fraction())


def memory_fraction() -> float:
    """JAX's GPU allocator limit as a fraction of device memory (ConfigError if malformed)."""
    from scm_jax.errors import ConfigError

    text = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "").strip() or "0.75"
    try:
        fraction = float(text)
    except ValueError:
        fraction = -1.0
    if not 0 < fraction <= 1:
        raise ConfigError(f"XLA_PYTHON_CLIENT_MEM_FRACTION={text!r}: expected a number in (0, 1]")
    return fraction


def is_gpu_product(product: str) -> bool:
    return re.match(r"\s*h\d00-", product) is not None


def parse_gpu_topology(product: str) -> GpuTopology:
    """'h100-8' -> one node of 8 H100s; 'h200-8x4' -> 4 nodes (ConfigError if unknown)."""
    from scm_jax.errors import ConfigError

    expected = (f"<gpu>-<gpus per node>[x<nodes>] with gpu one of {sorted(GPUS)}, gpus per node "
                f"one of {_GPUS_PER_NODE} and nodes a power of two (e.g. h100-8, h200-8x4)")
    match = re.fullmatch(r"(h\d00)-(\d+)(?:x(\d+))?", product.strip())
    if not match or match.group(1) not in GPUS:
        raise ConfigError(f"unknown --topology {product!r}; expected {expected}")
    per_node, nodes = int(match.group(2)), int(match.group(3) or 1)
    if per_node not in _GPUS_PER_NODE or nodes < 1 or nodes & (nodes - 1):
        raise ConfigError(f"--topology {product!r}: expected {expected}")
    return GpuTopology(product.strip(), GPUS[match.group(1)], per_node, nodes)


def target_config(gpu: Gpu) -> str:
    """The `GpuTargetConfigProto` (text form) XLA's GPU compiler needs to compile for `gpu`."""
    major, minor = gpu.compute_capability
    khz = int(gpu.clock_ghz * 1e6)
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: 232448
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: {gpu.sm_count}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(gpu.hbm_bytes_per_s)}
  l2_cache_size: {gpu.l2_bytes}
  clock_rate_ghz: {gpu.clock_ghz}
  device_memory_size: {gpu.hbm_bytes}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  name: "{gpu.name}"
  model_str: "sm_{major}.{minor} with {gpu.hbm_bytes}B RAM, {gpu.sm_count} cores, {khz}KHz clock"
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 patch: 0 }}
runtime_version {{ major: 12 minor: 8 }}
device_description_str: "{gpu.name}"
"""


def gpu_devices(topology: GpuTopology):
    """The GPU devices of `topology` (descriptions only: nothing is attached). Needs JAX's CUDA
    plugin (`pip install -e '.[gpu]'`; the [test] extra installs it too)."""
    from scm_jax.errors import MissingInputError

    try:
        import jax_cuda12_plugin  # noqa: F401
    except ImportError as err:
        raise MissingInputError("compiling for a GPU needs JAX's CUDA plugin on this host: pip "
                                "install -e '.[gpu]' (no GPU needed)") from err
    from jax.experimental import topologies

    desc = topologies.get_topology_desc(
        platform="cuda", target_config=target_config(topology.chip),
        topology=f"1x{topology.num_slices}x{topology.chips}")
    return list(desc.devices)
