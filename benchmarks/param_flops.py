"""Parameters and forward GFLOPs per image of every paper preset, next to the published figures.

    python benchmarks/param_flops.py [--json=PATH] [--only=edm2-in512-s,...]

Parameters come from `jax.eval_shape` of the network's init (nothing is allocated); FLOPs from
XLA's `cost_analysis()` of the *lowered* (not compiled) forward at batch 1, so the largest
presets cost seconds on a laptop. Published figures: the sCM paper's Tables 4/5 (parameters,
EDM2 network), EDM2's Table 2 (Gflops at 512: S 102, XXL 552; the M/L/XL figures are
unconfirmed recollections and are marked as such), DiT's Table 4 (Gflops at 256x256 images: S/2 6.06, B/2
23.01, L/2 80.71, XL/2 118.64; at 512x512 XL/2 is 524.6), EDM's DDPM++ (55.73 M parameters).
Our networks carry the sCM changes (ADN doubles each block's embedding projection), so their
parameter counts sit above the published ones by exactly that amount (tests/test_edm2.py,
tests/test_ddpmpp_dit.py check it); `--modulation=original` counts the unmodified networks.
"""
import json
import os
import sys

import jax
import jax.numpy as jnp
from flax.linen import meta

from scm_jax import cli, configs, paper_configs
from scm_jax.networks import build_network

# name -> (config spec, input shape, published params (M), published GFLOPs per image)
PRESETS = {
    "ddpmpp-cifar10": ("experiments/cifar10.py:variant=paper", (32, 32, 3), 55.73, None),
    **{f"edm2-in64-{s}": (f"experiments/imagenet64.py:variant={s}", (64, 64, 3), p, None)
       for s, p in paper_configs.IMAGENET64["paper_params_m"].items()},
    **{f"edm2-in512-{s}": (f"experiments/imagenet512.py:variant={s}", (64, 64, 4), p, g)
       for (s, p), g in zip(paper_configs.IMAGENET512["paper_params_m"].items(),
                            (102.0, 181.0, 282.0, 406.0, 552.0))},
    **{f"dit-in512-{s}": (f"experiments/imagenet512.py:variant={s},backbone=dit", (64, 64, 4),
                          p, g)
       for s, p, g in (("s", 33.0, None), ("b", 130.0, None), ("l", 458.0, None),
                       ("xl", 675.0, 524.6))},
}
UNCONFIRMED = {"edm2-in512-m", "edm2-in512-l", "edm2-in512-xl"}
ORIGINAL = {"edm2": "edm2", "ddpmpp": "additive", "dit": "adaln"}


def measure(spec, shape, modulation: str):
    model = configs.load_file(spec).model
    if modulation == "original":
        model.modulation = ORIGINAL[model.name]
    model.dtype = "float32"
    net = build_network(model, dropout=0.0)
    x = jax.ShapeDtypeStruct((1,) + shape, jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    y = jax.ShapeDtypeStruct((1,), jnp.int32) if model.num_classes else None
    g = jax.ShapeDtypeStruct((1,), jnp.float32) if model.get("guidance_input") else None
    inputs = lambda s: None if s is None else jnp.zeros(s.shape, s.dtype)  # noqa: E731
    boxed = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), *map(inputs, (x, t, y, g))))
    unboxed = meta.unbox(boxed["params"])
    count = sum(a.size for a in jax.tree.leaves(unboxed))
    lowered = jax.jit(lambda p, x, t, y, g: net.apply({"params": p}, x, t, y, g)).lower(
        unboxed, x, t, y, g)
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return count, float(cost.get("flops", float("nan")))


def _define_flags(fv) -> None:
    from absl import flags

    flags.DEFINE_string("json", "", "also write the rows to this JSON file", flag_values=fv)
    flags.DEFINE_string("only", "", "comma-separated preset names (default: all)", flag_values=fv)
    flags.DEFINE_enum("modulation", "sCM", ("sCM", "original"),
                      "the EDM2 blocks' modulation", flag_values=fv)


def main(argv=None):
    """The command; argv without the program name (sys.argv's by default). Returns the exit
    status."""
    return cli.run_command(__doc__, _define_flags, _measure_all, cli.program_argv(argv),
                           takes_overrides=False)


def _measure_all(args, overrides) -> int:
    names = [n for n in PRESETS if not args.only or n in args.only.split(",")]
    rows = {}
    print("| preset | params (M) | published (M) | ratio | GFLOPs / image | published | ratio |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        spec, shape, paper_m, paper_g = PRESETS[name]
        count, flops = measure(spec, shape, args.modulation)
        rows[name] = dict(params=count, gflops=flops / 1e9, paper_params_m=paper_m,
                          paper_gflops=paper_g, paper_gflops_unconfirmed=name in UNCONFIRMED,
                          input_shape=list(shape), modulation=args.modulation)
        pg = "-" if paper_g is None else f"{paper_g:g}" + ("?" if name in UNCONFIRMED else "")
        gr = "-" if paper_g is None else f"{flops / 1e9 / paper_g:.2f}"
        print(f"| {name} | {count / 1e6:.1f} | {paper_m:g} | {count / 1e6 / paper_m:.3f} | "
              f"{flops / 1e9:.1f} | {pg} | {gr} |", flush=True)
    print("(? = a published figure we could not confirm)", file=sys.stderr)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, backend=jax.default_backend()), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
