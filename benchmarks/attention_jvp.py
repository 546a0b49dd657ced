"""Fused attention forward+JVP kernel vs `jax.jvp` through XLA attention: memory and time.

    python benchmarks/attention_jvp.py [--ns 256,1024,4096,16384] [--json out.json]

For each sequence length N (batch 1, 16 heads, head dim 64 by default) it compiles the tangent
pass both ways on the default backend and reports the compiled peak memory
(`memory_analysis()`: arguments + outputs + temporaries) and, up to `--time-max-n`, the median
wall time and the throughput counting 3x the forward FLOPs (6 matmuls; sCM App. F). With libtpu
installed it also compiles both ahead of time for a TPU v5p:2x2x1 slice (batch 4, one row per
chip) and reports their per-chip memory. Times are only comparable within one run.
"""
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from scm_jax import cli
from scm_jax.kernels import flash_jvp as fj
from scm_jax.networks.attention import dot_product_attention


def fused_fn(backend, mesh=None):
    if mesh is None:
        return lambda q, k, v, dq, dk, dv: fj.attention_jvp(q, k, v, dq, dk, dv, backend=backend)
    return lambda q, k, v, dq, dk, dv: fj.sharded_attention_jvp(q, k, v, dq, dk, dv, mesh=mesh,
                                                               backend=backend)


def xla_fn(q, k, v, dq, dk, dv):
    return jax.jvp(dot_product_attention, (q, k, v), (dq, dk, dv))


def memory(compiled):
    m = compiled.memory_analysis()
    return dict(peak_bytes=m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes,
                temp_bytes=m.temp_size_in_bytes)


def measure(fn, shape, dtype, *, timed, repeats):
    x = jax.ShapeDtypeStruct(shape, dtype)
    compiled = jax.jit(fn).lower(*[x] * 6).compile()
    out = memory(compiled)
    if timed:
        keys = jax.random.split(jax.random.PRNGKey(0), 6)
        args = [jax.random.normal(k, shape, dtype) for k in keys]
        jax.block_until_ready(compiled(*args))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - start)
        out["time_s"] = statistics.median(times)
        b, n, h, d = shape
        out["tflops"] = fj.attention_flops(b, n, n, h, d) / out["time_s"] / 1e12
    return out


def tpu_aot(ns, heads, head_dim):
    """Per-chip compiled memory on a v5p:2x2x1 slice, or {} without libtpu."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        print("libtpu not installed: no AOT TPU figures (pip install libtpu)")
        return {}
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

    topo = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1",
                                        chip_config_name="default",
                                        chips_per_host_bounds=(2, 2, 1), num_slices=1)
    mesh = Mesh(np.asarray(topo.devices), ("data",), axis_types=(AxisType.Auto,))
    results = {}
    for n in ns:
        x = jax.ShapeDtypeStruct((len(topo.devices), n, heads, head_dim), jnp.bfloat16,
                                 sharding=NamedSharding(mesh, P("data")))
        for impl, fn in (("fused", fused_fn("mosaic_tpu", mesh)), ("xla", xla_fn)):
            compiled = jax.jit(fn).lower(*[x] * 6).compile()
            results[f"n{n}_tpu-v5p-aot_{impl}"] = dict(n=n, backend="tpu-v5p-aot", impl=impl,
                                                       **memory(compiled))
    return results


def _define_flags(fv) -> None:
    from absl import flags

    flags.DEFINE_string("ns", "256,1024,4096,16384", "comma-separated sequence lengths N",
                        flag_values=fv)
    flags.DEFINE_integer("batch", 1, "batch size B", flag_values=fv)
    flags.DEFINE_integer("heads", 16, "heads H", flag_values=fv)
    flags.DEFINE_integer("head_dim", 64, "head dimension D", flag_values=fv)
    flags.DEFINE_string("dtype", None, "default: float32 on CPU, else bfloat16", flag_values=fv)
    flags.DEFINE_integer("time_max_n", None, "time only N up to this (default: 1024 on CPU, all "
                         "elsewhere)", flag_values=fv)
    flags.DEFINE_integer("xla_time_max_n", None, "time the XLA JVP only up to this N (default: "
                         "--time_max_n)", flag_values=fv)
    flags.DEFINE_integer("repeats", 3, "timed repeats", flag_values=fv)
    flags.DEFINE_bool("no_tpu_aot", False, "skip the TPU v5p compile (memory from the TPU "
                      "compiler on this host)", flag_values=fv)
    flags.DEFINE_string("json", None, "write the results here", flag_values=fv)


def main(argv=None):
    """The command; argv without the program name (sys.argv's by default). Returns the exit
    status."""
    return cli.run_command(__doc__, _define_flags, _measure_all, cli.program_argv(argv),
                           takes_overrides=False)


def _measure_all(args, overrides) -> int:
    platform = jax.default_backend()
    backend = fj.default_backend()
    dtype = jnp.dtype(args.dtype or ("float32" if platform == "cpu" else "bfloat16"))
    ns = [int(n) for n in args.ns.split(",")]
    time_max = args.time_max_n or (1024 if platform == "cpu" else max(ns))
    xla_time_max = args.xla_time_max_n or time_max
    results = {}
    for n in ns:
        shape = (args.batch, n, args.heads, args.head_dim)
        for impl, fn, limit in (("fused", fused_fn(backend), time_max),
                                ("xla", xla_fn, xla_time_max)):
            r = measure(fn, shape, dtype, timed=n <= limit, repeats=args.repeats)
            results[f"n{n}_{platform}_{impl}"] = dict(n=n, backend=platform, impl=impl,
                                                      kernel_backend=backend, **r)
    if not args.no_tpu_aot:
        results.update(tpu_aot(ns, args.heads, args.head_dim))

    print(f"device: {jax.devices()[0].device_kind}; B={args.batch} H={args.heads} "
          f"D={args.head_dim} {dtype.name}; fused kernel backend: {backend}")
    print(f"{'N':>6} {'backend':>12} {'fused peak':>12} {'xla peak':>12} {'mem ratio':>9} "
          f"{'fused ms':>10} {'xla ms':>10} {'speedup':>8} {'fused TF/s':>10}")
    for n in ns:
        for plat in (platform, "tpu-v5p-aot"):
            f, x = results.get(f"n{n}_{plat}_fused"), results.get(f"n{n}_{plat}_xla")
            if f is None:
                continue
            ms = lambda r: (f"{1e3 * r['time_s']:10.1f}" if "time_s" in r  # noqa: E731
                            else f"{'-':>10}")
            speed = (f"{x['time_s'] / f['time_s']:7.2f}x" if "time_s" in f and "time_s" in x
                     else f"{'-':>8}")
            tf = f"{f['tflops']:10.3f}" if "tflops" in f else f"{'-':>10}"
            mib = lambda r: f"{r['peak_bytes'] / 2**20:10.1f}Mi"  # noqa: E731
            print(f"{n:>6} {plat:>12} {mib(f)} {mib(x)} {x['peak_bytes'] / f['peak_bytes']:8.1f}x "
                  f"{ms(f)} {ms(x)} {speed} {tf}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(device=jax.devices()[0].device_kind, dtype=dtype.name,
                           batch=args.batch, heads=args.heads, head_dim=args.head_dim,
                           results=results), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
