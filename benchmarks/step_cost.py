"""Cost of an sCM training step relative to a diffusion (teacher) step, same network and batch.

    python benchmarks/step_cost.py [--config=experiments/digits.py] [--batch=64] [--steps=20]
                                   [--json=PATH]
    python benchmarks/step_cost.py --config=experiments/imagenet64.py:variant=runlocal \
        --synthetic --batch=8 --config.model.channels=32      # a paper backbone, reduced

`--synthetic` feeds random batches of the config's data shape (the paper datasets need prepared
files); `--config.<key>=<value>` (repeatable) overrides config entries, e.g. to shrink a
backbone.

For each stage (teacher, sCT, sCD, dsCD) it compiles the jitted train step once, times `--steps`
calls (median, after one warm-up call) and reads the compiled step's FLOPs from XLA's
`cost_analysis()`. Ratios are against the teacher step measured in the same process.

It also answers whether XLA shares work between the two sCM passes: the tangent pass's primal
output F^- and the gradient pass's forward compute the same values from the same inputs. The
FLOPs of the standalone pieces (forward, forward+backward, JVP) give what an sCT step would cost
with and without that sharing; the compiled sCT step's FLOPs say which one XLA produced.
"""
import json
import os
import sys

import jax
import jax.numpy as jnp

from scm_jax import cli, configs, objectives
from scm_jax.data import build_train_batches
from scm_jax.objectives.scm import scm_tangent
from scm_jax.step_cost import flops_of, measure

STAGES = ("teacher", "sct", "scd", "dscd")


def synthetic_batch(config, batch_size: int) -> dict:
    from scm_jax.data import data_shape

    key_x, key_y = jax.random.split(jax.random.PRNGKey(0))
    shape = (batch_size,) + tuple(data_shape(config.data))
    return dict(image=config.data.sigma_d * jax.random.normal(key_x, shape),
                label=jax.random.randint(key_y, (batch_size,), 0, max(config.model.num_classes, 1)))


def _define_flags(fv) -> None:
    from absl import flags

    flags.DEFINE_string("config", "experiments/digits.py", "experiments/<name>.py[:arg]; "
                        "entries overridden with --config.<key>=<value>", flag_values=fv)
    flags.DEFINE_integer("batch", 64, "images per step", flag_values=fv)
    flags.DEFINE_integer("steps", 20, "timed calls per stage (the median counts)", flag_values=fv)
    flags.DEFINE_string("json", "", "also write the results to this JSON file", flag_values=fv)
    flags.DEFINE_bool("synthetic", False, "random batches of the data shape instead of the "
                      "dataset", flag_values=fv)


def main(argv=None):
    """The command; argv without the program name (sys.argv's by default). Returns the exit
    status."""
    return cli.run_command(__doc__, _define_flags, _measure_all, cli.program_argv(argv))


def _measure_all(args, overrides) -> int:
    overrides = list(overrides) + [f"{name}.{key}={value}" for name in STAGES
                                   for key, value in (("batch_size", args.batch),
                                                      ("dropout", 0.0))]  # one network function
    config = configs.load(args.config, overrides)
    if args.synthetic:
        batch = synthetic_batch(config, args.batch)
    else:
        batches = build_train_batches(config.data, batch_size=args.batch, seed=0)
        batch = {k: jnp.asarray(v) for k, v in next(batches).items()}
    shape = batch["image"].shape[1:]
    rows = measure(config, STAGES, batch, calls=args.steps,
                   log=lambda m: print(m, file=sys.stderr, flush=True))

    # Standalone pieces, to see whether the sCT step shares F^- with the gradient pass's forward.
    stage = objectives.build(config, "sct")
    # The student's own parameters (a guided student has an input the teacher lacks).
    params = stage.init_state(jax.random.PRNGKey(1), shape).nets["net"].params
    x = batch["image"]
    t = jnp.full((args.batch,), 0.7)
    cond = {"y": batch["label"]} if config.model.num_classes else {}
    if config.model.get("guidance_input"):
        cond["guidance"] = jnp.ones((args.batch,), jnp.float32)
    key = jax.random.PRNGKey(0)
    fwd = jax.jit(lambda p: stage.net_train(p, x, t, cond, key))
    fwd_bwd = jax.jit(jax.grad(lambda p: jnp.sum(stage.net_train(p, x, t, cond, key) ** 2)))
    jvp = jax.jit(lambda p: scm_tangent(stage.net_train, p, x, t, x, cond, key,
                                        sigma_d=stage.sigma_d, warmup_ratio=1.0))
    pieces = {name: flops_of(fn.lower(params).compile())
              for name, fn in (("forward", fwd), ("forward_backward", fwd_bwd), ("jvp", jvp))}
    without_sharing = pieces["jvp"] + pieces["forward_backward"]
    with_sharing = without_sharing - pieces["forward"]

    result = dict(
        config=args.config, batch=args.batch, device=str(jax.devices()[0].device_kind),
        backend=jax.default_backend(), steps=rows, pieces_flops=pieces,
        ratios={name: dict(time=r["time_ratio"], flops=r["flops_ratio"])
                for name, r in rows.items()},
        sct_flops_if_unshared=without_sharing, sct_flops_if_shared=with_sharing,
        sct_shares_forward=abs(rows["sct"]["flops"] - with_sharing)
        < abs(rows["sct"]["flops"] - without_sharing),
    )
    print("\n| step | median time | time / teacher | GFLOP | FLOPs / teacher |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        ratio = result["ratios"][name]
        print(f"| {name} | {r['seconds'] * 1e3:.1f} ms | {ratio['time']:.2f}x | "
              f"{r['flops'] / 1e9:.2f} | {ratio['flops']:.2f}x |")
    print(f"\nsCT step FLOPs {rows['sct']['flops'] / 1e9:.2f} G; without sharing F^- it would be "
          f"{without_sharing / 1e9:.2f} G, with sharing {with_sharing / 1e9:.2f} G -> XLA "
          f"{'shares' if result['sct_shares_forward'] else 'does not share'} the forward pass.")
    print(f"device: {result['device']} ({result['backend']}), batch {args.batch}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
