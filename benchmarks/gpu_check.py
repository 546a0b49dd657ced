"""The one script to run on a lent GPU: what the CPU host can only compile, measured.

    python benchmarks/gpu_check.py [--out=DIR] [--batch=32] [--calls=10] [--ns=1024,4096,8192]
        [--networks=dit-s,edm2-s] [--sample_batch=64]
    python benchmarks/gpu_check.py --dry --out=DIR     # the same plumbing on a CPU, tiny sizes

1. The device: kind, memory JAX's allocator may use.
2. The fused attention-JVP kernel's Triton body on the GPU (until now only interpreted or
   compiled deviceless): its output and tangent against the float32 reference (`jax.jvp`
   through XLA attention) for the head dims and key masks the networks use.
3. Its time, TFLOP/s and compiled peak memory against that XLA JVP in bfloat16 at sequence
   lengths --ns (batch 2, 8 heads of 64): the goal is at least 3x faster and 10x less memory at
   N = 8192. A length where the XLA JVP runs out of memory is recorded as such.
4. Train steps of DiT-S and EDM2-S at ImageNet 512 on one GPU (random data of the latent
   shape, --batch images): teacher, sCT and guided sCD, each compiled once and timed (median of
   --calls after a warm-up), with the ratios to the teacher step, the compiled peak memory, and
   the compile check's roofline estimate for the same compiled program (`scm_jax.gpu_roofline`)
   against the measured time (that ratio calibrates the roofline of the compile check).
5. Sampling throughput of DiT-S (random weights, --sample_batch images): 1 and 2 steps
   against the teacher's ODE solver at 63 evaluations (`benchmarks/sampling.py`).

Writes DIR/gpu_check.json after every section (DIR: --out, else $OUT, else the working
directory), so a run cut short keeps what it measured, and prints a summary. Expected to take
3-8 minutes on one H100/H200, most of it compiling the six train steps. `--dry` runs everything on the CPU with tiny shapes, the kernel in Triton's
interpreter and the runlocal DiT, the roofline of an H100: to test the script, not to measure.
"""
import json
import os
import sys
import time

import numpy as np

KERNEL_CASES = ((64, False), (128, False), (64, True), (72, True))   # head dim, key mask


def device_info(jax) -> dict:
    device = jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return dict(platform=device.platform, kind=device.device_kind, count=len(jax.devices()),
                bytes_limit=(stats or {}).get("bytes_limit"), jax=jax.__version__)


def kernel_accuracy(jax, jnp, flash_jvp, backend: str, shape: tuple) -> list:
    """Max |error| of the kernel's O and dO against the float32 XLA reference."""
    rows = []
    b, n, h, _ = shape
    for d, masked in KERNEL_CASES:
        keys = jax.random.split(jax.random.PRNGKey(d + masked), 7)
        q, k, v, dq, dk, dv = (jax.random.normal(key, (b, n, h, d), jnp.float32)
                               for key in keys[:6])
        mask = (jax.random.uniform(keys[6], (b, n)) > 0.3).at[:, 0].set(True) if masked else None
        o, do = jax.jit(lambda *a: flash_jvp.attention_jvp(*a, kv_mask=mask, backend=backend))(
            q, k, v, dq, dk, dv)
        ro, rdo = flash_jvp.reference_attention_jvp(q, k, v, dq, dk, dv, kv_mask=mask)
        rows.append(dict(head_dim=d, masked=masked,
                         max_err_out=float(jnp.max(jnp.abs(o - ro))),
                         max_err_tangent=float(jnp.max(jnp.abs(do - rdo))),
                         tangent_scale=float(jnp.max(jnp.abs(rdo)))))
    return rows


def kernel_speed(jax, jnp, attention_jvp, backend: str, shape: tuple, repeats: int) -> dict:
    """The fused kernel and `jax.jvp` through XLA attention at `shape`: peak bytes, time and
    TFLOP/s of each; an implementation that fails (e.g. out of memory) is recorded with its
    error instead."""
    dtype = jnp.float32 if backend != "triton" else jnp.bfloat16
    out = {}
    for impl, fn in (("fused", attention_jvp.fused_fn(backend)), ("xla", attention_jvp.xla_fn)):
        try:
            out[impl] = attention_jvp.measure(fn, shape, dtype, timed=True, repeats=repeats)
        except Exception as err:  # noqa: BLE001 -- recorded: out of memory is an answer here
            out[impl] = dict(error=f"{type(err).__name__}: {str(err).splitlines()[0][:300]}")
    if "time_s" in out["fused"] and "time_s" in out["xla"]:
        out["speedup"] = out["xla"]["time_s"] / out["fused"]["time_s"]
        out["memory_ratio"] = out["xla"]["peak_bytes"] / out["fused"]["peak_bytes"]
    return dict(shape=list(shape), dtype=np.dtype(dtype).name, **out)


def train_steps(jax, config_spec: str, batch: int, calls: int, topology) -> dict:
    """Teacher, sCT and sCD steps: measured seconds, ratios, memory, the roofline estimate."""
    from scm_jax import configs, gpu_roofline, step_cost

    stages = ("teacher", "sct", "scd")
    overrides = [f"{s}.{k}={v}" for s in stages for k, v in (("batch_size", batch),
                                                             ("dropout", 0.0))]
    config = configs.load(config_spec, overrides)
    from step_cost import synthetic_batch   # benchmarks/step_cost.py (main put it on the path)

    rows = step_cost.measure(config, stages, synthetic_batch(config, batch), calls=calls,
                             keep_compiled=True,
                             log=lambda m: print(m, file=sys.stderr, flush=True))
    out = {}
    for name, r in rows.items():
        compiled = r.pop("compiled")
        memory = compiled.memory_analysis()
        roof = gpu_roofline.figures(compiled, topology)
        out[name] = dict(
            seconds=r["seconds"], time_vs_teacher=r["time_ratio"],
            peak_bytes=int(memory.argument_size_in_bytes + memory.output_size_in_bytes
                           + memory.temp_size_in_bytes - memory.alias_size_in_bytes),
            flops=roof["flops"], roofline_seconds=roof["seconds"],
            measured_vs_roofline=r["seconds"] / roof["seconds"],
            kernel_flops=roof["kernel_flops"], uncounted_kernels=roof["uncounted_kernels"],
            achieved_flops_per_s=roof["flops"] / r["seconds"],
            images_per_s=batch / r["seconds"])
    for r in out.values():
        r["flops_vs_teacher"] = r["flops"] / out["teacher"]["flops"]
    return dict(config=config_spec, batch=batch, calls=calls, stages=out)


def sampling_throughput(config_spec: str, batch: int, repeats: int) -> dict:
    """Images/s of 1-step, 2-step and the teacher's NFE-63 ODE solver on one network."""
    import sampling   # benchmarks/sampling.py

    rows = {r["sampler"]: r for r in sampling.sampler_throughput(config_spec, batch, repeats)}
    teacher = rows["teacher NFE 63"]["images_per_second"]
    return dict(config=config_spec, batch=batch, samplers=rows,
                one_step_vs_teacher=rows["1-step"]["images_per_second"] / teacher,
                two_step_vs_teacher=rows["2-step"]["images_per_second"] / teacher)


def _define_flags(fv) -> None:
    from absl import flags

    flags.DEFINE_string("out", os.environ.get("OUT", "."), "where gpu_check.json goes "
                        "(default: $OUT, else the working directory)", flag_values=fv)
    flags.DEFINE_integer("batch", 32, "images per train step", flag_values=fv)
    flags.DEFINE_integer("calls", 10, "timed calls per measurement", flag_values=fv)
    flags.DEFINE_string("ns", "1024,4096,8192", "sequence lengths of the kernel's speed and "
                        "memory", flag_values=fv)
    flags.DEFINE_string("networks", "dit-s,edm2-s", "train steps of these ImageNet 512 networks",
                        flag_values=fv)
    flags.DEFINE_integer("sample_batch", 64, "images per sampling call", flag_values=fv)
    flags.DEFINE_bool("dry", False, "CPU, tiny sizes, interpreted kernel: tests the script only",
                      flag_values=fv)


def main(argv=None) -> int:
    """The command; argv without the program name (sys.argv's by default). Returns the exit
    status."""
    from scm_jax import cli

    return cli.run_command(__doc__, _define_flags, _check, cli.program_argv(argv),
                           takes_overrides=False)


def _check(args, overrides) -> int:
    from scm_jax.errors import ConfigError, UserError

    networks = [n for n in args.networks.split(",") if n]
    unknown = sorted(set(networks) - {"dit-s", "edm2-s"})
    if unknown:
        raise ConfigError(f"--networks: unknown {unknown}; expected some of ['dit-s', 'edm2-s']")
    if args.dry:
        os.environ["JAX_PLATFORMS"] = "cpu"
        import jax

        jax.config.update("jax_platforms", "cpu")   # JAX read the variable when imported
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import attention_jvp

    from scm_jax import gpu_nodes
    from scm_jax.kernels import flash_jvp

    info = device_info(jax)
    if not args.dry and info["platform"] != "gpu":
        raise UserError(f"no GPU here (JAX sees {info['platform']}); --dry tests the script on "
                        f"a CPU")
    kind = info["kind"].lower()
    gpu = "h200" if "h200" in kind else "h100"   # the roofline's figures (H100 for other GPUs)
    topology = gpu_nodes.parse_gpu_topology(f"{gpu}-1")
    backend = "triton_interpret" if args.dry else "triton"
    start = time.perf_counter()
    report = dict(dry=args.dry, device=info, roofline_gpu=topology.chip.name)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu_check.json")

    def save():
        report["seconds"] = time.perf_counter() - start
        with open(path + ".tmp", "w") as f:
            json.dump(report, f, indent=1)
        os.replace(path + ".tmp", path)

    report["kernel_accuracy"] = kernel_accuracy(jax, jnp, flash_jvp, backend,
                                                (1, 32, 2, 0) if args.dry else (2, 1024, 4, 0))
    save()
    ns = [64, 128] if args.dry else [int(n) for n in args.ns.split(",")]
    report["kernel_speed"] = []
    for n in ns:
        report["kernel_speed"].append(kernel_speed(
            jax, jnp, attention_jvp, backend, (1, n, 2, 64) if args.dry else (2, n, 8, 64),
            2 if args.dry else args.calls))
        save()
    spec = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "experiments", "imagenet512.py")
    specs = {"dit-s": f"{spec}:variant={'runlocal' if args.dry else 's'},backbone=dit",
             "edm2-s": f"{spec}:variant={'runlocal' if args.dry else 's'}"}
    report["train_steps"] = {}
    for name in networks:
        report["train_steps"][name] = train_steps(
            jax, specs[name], 4 if args.dry else args.batch, 2 if args.dry else args.calls,
            topology)
        save()
    report["sampling"] = sampling_throughput(specs["dit-s"], 4 if args.dry else args.sample_batch,
                                             2 if args.dry else 5)
    save()

    print(f"device: {info['kind']} x{info['count']}, jax {info['jax']}")
    for r in report["kernel_accuracy"]:
        print(f"kernel d={r['head_dim']}{' masked' if r['masked'] else ''}: max |err| O "
              f"{r['max_err_out']:.2e}, dO {r['max_err_tangent']:.2e} (|dO| <= "
              f"{r['tangent_scale']:.1f})")
    for s in report["kernel_speed"]:
        f, x = s["fused"], s["xla"]
        text = lambda r: (f"{1e3 * r['time_s']:.2f} ms, {r['tflops']:.1f} TFLOP/s, "  # noqa: E731
                          f"{r['peak_bytes'] / 2 ** 20:.0f} MiB" if "time_s" in r else r["error"])
        print(f"kernel {s['shape']} {s['dtype']}: fused {text(f)}; XLA JVP {text(x)}"
              + (f" (speed-up {s['speedup']:.2f}x, memory XLA / fused {s['memory_ratio']:.1f}x)"
                 if "speedup" in s else ""))
    for network, steps in report["train_steps"].items():
        for name, r in steps["stages"].items():
            print(f"{network} {name:8s} {1e3 * r['seconds']:8.1f} ms ({r['time_vs_teacher']:.2f}x "
                  f"teacher; FLOPs {r['flops_vs_teacher']:.2f}x), {r['peak_bytes'] / 2 ** 30:.2f} "
                  f"GiB, roofline {1e3 * r['roofline_seconds']:.1f} ms (measured / roofline "
                  f"{r['measured_vs_roofline']:.2f}), {r['images_per_s']:.0f} images/s")
    sampled = report["sampling"]
    for name, r in sampled["samplers"].items():
        print(f"sampling {name:15s} {r['images_per_second']:10.1f} images/s")
    print(f"1-step / teacher NFE-63 images/s: {sampled['one_step_vs_teacher']:.1f}x, 2-step: "
          f"{sampled['two_step_vs_teacher']:.1f}x")
    print(f"wrote {path} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
