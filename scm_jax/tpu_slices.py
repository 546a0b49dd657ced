"""TPU slices by their Cloud TPU product names: chips, HBM, peak FLOP/s, interconnect, torus
shape, and their devices as libtpu describes them on a host that has none.

Topologies: `v5p-N` (N TensorCores, 2 per chip, as Cloud TPU names them), `v5litepod-N` or
`v5e-N` and `v6e-N` (N chips), each a power of two in the slice sizes Cloud TPU offers.
"""
import dataclasses
import math
import os
import re

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str                  # the topology_name prefix libtpu takes
    hbm_bytes: int
    peak_bf16_flops: float     # per chip
    counts_cores: bool         # the product name counts TensorCores (2 per chip), not chips
    three_d: bool              # a 3-D torus (v5p) or a 2-D one (v5e, v6e)


CHIPS = {
    "v5p": Chip("v5p", 95 * GIB, 459e12, True, True),
    "v5e": Chip("v5e", 16 * GIB, 197e12, False, False),
    "v5litepod": Chip("v5e", 16 * GIB, 197e12, False, False),
    "v6e": Chip("v6e", 32 * GIB, 918e12, False, False),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    product: str               # e.g. 'v5p-128'
    chip: Chip
    chips: int
    shape: tuple               # chips per torus dimension
    host_bounds: tuple         # chips per host
    num_slices: int = 1
    platform: str = "tpu"

    @property
    def available_bytes(self) -> int:
        """HBM a program may use per chip."""
        return self.chip.hbm_bytes

    @property
    def name(self) -> str:
        return f"{self.chip.name}:{'x'.join(map(str, self.shape))}"


def _torus(chips: int, dims: int) -> tuple:
    """The slice shape Cloud TPU uses for `chips` chips (v5p-8: 2x2x1, v5p-128: 4x4x4, v6e-32:
    4x8): from the smallest slice, double the smallest dimension, the last one among equals."""
    shape = [2, 2, 1] if dims == 3 else [1, 1]
    while math.prod(shape) < chips:
        smallest = min(shape)
        i = max(j for j, n in enumerate(shape) if n == smallest)
        shape[i] *= 2
    return tuple(shape)


def parse_topology(product: str, num_slices: int = 1) -> Topology:
    """'v5p-128' -> 64 chips on a 4x4x4 torus; 'v6e-16' -> 16 chips on 4x4 (ConfigError if unknown)."""
    from scm_jax.errors import ConfigError

    match = re.fullmatch(r"(v5p|v5e|v5litepod|v6e)-(\d+)", product.strip())
    expected = ("v5p-N (N TensorCores: 8, 16, ..., 2 per chip), v5litepod-N / v5e-N or v6e-N "
                "(N chips: 1, 4, 8, 16, ...), N a power of two")
    if not match:
        raise ConfigError(f"unknown --topology {product!r}; expected {expected}")
    chip = CHIPS[match.group(1)]
    count = int(match.group(2))
    chips = count // 2 if chip.counts_cores else count
    smallest = 4 if chip.three_d else 1
    if chips < smallest or chips & (chips - 1) or (chip.counts_cores and count % 2):
        raise ConfigError(f"--topology {product!r} is not a slice Cloud TPU offers; expected "
                          f"{expected}")
    if num_slices < 1:
        raise ConfigError(f"--num_slices = {num_slices} must be >= 1")
    if chip.three_d:
        shape = _torus(chips, 3)
        host = (2, 2, 1)
    else:
        shape = _torus(chips, 2)
        host = shape if chips <= 8 else (2, 2)   # single-host slices hold up to 8 chips
    return Topology(product, chip, chips, shape, host + (1,) * (3 - len(host)), num_slices)


def topology_devices(topology: Topology):
    """The TPU devices of `topology` (descriptions only: nothing is attached)."""
    from scm_jax.errors import MissingInputError

    try:
        import libtpu  # noqa: F401
    except ImportError as err:
        raise MissingInputError("compiling for a TPU needs libtpu on this host: pip install -e "
                                "'.[tpu]' (or the [test] extra, which pins the version the "
                                "installed jax expects)") from err
    # Only a description is needed: quiet libtpu's host probing, and let it load beside other
    # processes that hold it.
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", topology.product)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=topology.name, chip_config_name="default",
        chips_per_host_bounds=topology.host_bounds, num_slices=topology.num_slices)
    return list(desc.devices)


# Per-chip interconnect bandwidth (ICI, bytes/s, all links together): the compiler gives no
# time for collectives, so their time is estimated from the bytes they move.
ICI_BYTES_PER_S = {"v5p": 600e9, "v5e": 200e9, "v6e": 448e9}
