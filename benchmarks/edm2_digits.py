"""EDM2's published-network path, end to end on digits: a teacher in EDM2's parameterization,
written as an EDM2 network pickle, imported, distilled by sCD, evaluated.

    python benchmarks/edm2_digits.py --workdir=/tmp/edm2_digits \
        [--json=benchmarks/results/edm2_digits.json] [--variant=default|tiny]

1. Trains the digits teacher with `experiments/digits.py:teacher=edm2` (EDM2's own U-Net at a
   small width: EDM's time input ln(sigma_d tan t) / 4, MPFourier, EDM2's modulation, the output
   negated) in WORKDIR/trained, with the digits teacher's settings.
2. Writes its EMA as EDM2's training loop pickles a network (`tests/edm2_format.py`: a `Precond`
   of `UNet`, `Block`, `MPConv` and `MPFourier` persistent objects, float16 tensors, EDM2's
   state-dict names; EDM2's uncertainty head random, as it is not used), WORKDIR/edm2-digits.pkl.
3. Imports it into WORKDIR/imported (`python -m scm_jax.import_teacher`, in-process).
4. Distills it with sCD (the digits sCD settings), logging the tangent norm and any skipped
   non-finite step.
5. Evaluates the imported teacher and the sCD student (the digits table of docs/results.md).

Prints the table and the stability figures and writes them to --json.
"""
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402

from scm_jax import (cli, configs, evaluate, import_teacher, objectives,  # noqa: E402
                     stage_restore, train)
from scm_jax.networks.edm2_names import params_to_edm2  # noqa: E402
from tests import edm2_format  # noqa: E402  (the EDM2-format pickle writer)


def edm2_kwargs(config) -> dict:
    """EDM2's Precond / UNet constructor arguments of the config's EDM2-native network."""
    m = config.model
    resolution, channels = 8, 1   # digits
    return dict(img_resolution=resolution, img_channels=channels, label_dim=m.num_classes,
                model_channels=m.channels, channel_mult=list(m.channel_mult),
                channel_mult_noise=m.noise_channels // m.channels,
                channel_mult_emb=m.emb_channels // m.channels, num_blocks=m.num_blocks,
                attn_resolutions=list(m.attn_resolutions), channels_per_head=m.channels_per_head,
                sigma_data=float(config.data.sigma_d), logvar_channels=128)


def write_pickle(config, workdir: str, path: str) -> dict:
    """The trained teacher's EMA as an EDM2 network pickle at `path`; returns its kwargs."""
    objective = objectives.build(config, "teacher")
    ema, _ = stage_restore.restore_stage_ema(config, "teacher", workdir)
    kwargs = edm2_kwargs(config)
    state = edm2_format.random_edm2_params(kwargs, np.random.default_rng(0))
    ours = params_to_edm2(ema, objective.networks["net"].module)
    unet = {k for k in state if k.startswith("unet.")}
    if set(ours) != unet:
        raise RuntimeError(f"the EDM2 names differ: {sorted(set(ours) ^ unet)[:5]}")
    state.update({k: np.asarray(v, np.float32) for k, v in ours.items()})
    edm2_format.write_edm2_pickle(path, state, kwargs)
    return kwargs


def stability(workdir: str, stage: str) -> dict:
    """Tangent-norm range and skipped steps from a stage's metrics.jsonl."""
    rows = [json.loads(line) for line in open(os.path.join(workdir, stage, "metrics.jsonl"))
            if line.strip()]
    norms = [r["tangent_norm"] for r in rows if isinstance(r.get("tangent_norm"), float)]
    finite = all(isinstance(r.get("loss"), float) for r in rows if "loss" in r)
    return dict(logged_steps=len(rows), tangent_norm_min=min(norms) if norms else None,
                tangent_norm_max=max(norms) if norms else None,
                skipped_steps=max((r.get("skipped_steps", 0) for r in rows), default=0),
                all_losses_finite=finite)


def _define_flags(fv) -> None:
    from absl import flags

    flags.DEFINE_string("workdir", None, "where the two pipelines' stages and the pickle go",
                        flag_values=fv)
    flags.mark_flag_as_required("workdir", flag_values=fv)
    flags.DEFINE_string("json", "", "also write the results to this JSON file", flag_values=fv)
    flags.DEFINE_enum("variant", "default", ("default", "tiny"), "the digits experiment's size",
                      flag_values=fv)


def main(argv=None) -> int:
    """The command; argv without the program name (sys.argv's by default). Returns the exit
    status."""
    return cli.run_command(__doc__, _define_flags, _run, cli.program_argv(argv),
                           takes_overrides=False)


def _run(args, overrides) -> int:
    spec = os.path.join(REPO, "experiments", f"digits.py:variant={args.variant},teacher=edm2")
    config = configs.load(spec, [])
    config.pipeline = ("teacher", "scd", "eval")
    say = lambda m: print(m, flush=True)  # noqa: E731
    trained, imported = (os.path.join(args.workdir, d) for d in ("trained", "imported"))
    pkl = os.path.join(args.workdir, "edm2-digits.pkl")
    start, seconds = time.time(), {}
    train.train_stage(config, "teacher", trained, log=say)
    seconds["teacher"] = time.time() - start
    kwargs = write_pickle(config, trained, pkl)
    say(f"wrote {pkl} ({os.path.getsize(pkl) / 2 ** 20:.1f} MiB)")
    import_teacher.import_edm2_teacher(config, pkl, imported, log=say)
    start = time.time()
    train.train_stage(config, "scd", imported, log=say)
    seconds["scd"] = time.time() - start
    start = time.time()
    summary = evaluate.evaluate_all(config, imported, log=say)
    seconds["eval"] = time.time() - start
    result = dict(config=spec, edm2_kwargs=kwargs, seconds=seconds, results=summary,
                  scd_stability=stability(imported, "scd"))
    print(evaluate.format_table(summary))
    print("sCD stability:", json.dumps(result["scd_stability"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
