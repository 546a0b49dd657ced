"""The evaluation stage: sample every trained model, score it, write the table.

For the digits experiment: every training stage of `config.pipeline` that has a checkpoint,
sampled as its objective says (`objective.sampler`): a diffusion model at each solver length of
`config.eval.teacher_steps` (2N - 1 evaluations for N steps), a consistency model at 1 and 2
steps (t_mid = config.eval.t_mid); and the held-out real split as the floor. Each model's
samples are saved as `<workdir>/samples/<stage>_<nfe>.npz` (key `images`, [N, 8, 8, 1] in
[-1, 1], the scale the models are trained on; key `labels`, [N]). Scores: Frechet distance in
the features of the package's digits classifier, that classifier's accuracy on the
class-conditional samples, and k-NN (k=3) precision/recall. Results go to
`<workdir>/results.json` and are printed as a table (primary process only). Sampling is
spread over every device of `config.mesh` and every process.
"""
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from scm_jax import checkpoint as ckpt
from scm_jax import configs, files, objectives, sampling, sharding
from scm_jax.data import data_shape, load_digits_splits
from scm_jax.errors import ConfigError, MissingInputError
from scm_jax.evaluation import DigitsEvaluator, classifier_predict, load_or_train_classifier


def _generate(draw, params, batch_size: int, labels: np.ndarray, key, mesh) -> np.ndarray:
    """Samples for `labels` in batches of `batch_size` (the last one padded), in [-1, 1].

    Each batch is split over every device of the mesh (on a multi-process run each process's
    devices draw their share) and gathered to every process, where the primary writes it.
    """
    out = []
    split, repl = sharding.batch_sharded(mesh), sharding.replicated(mesh)
    for i, start in enumerate(range(0, len(labels), batch_size)):
        chunk = labels[start:start + batch_size]
        pad = batch_size - len(chunk)
        padded = np.concatenate([chunk, np.zeros(pad, chunk.dtype)]) if pad else chunk
        images = draw(params, jax.device_put(jax.random.fold_in(key, i), repl),
                      jax.device_put(padded, split))
        out.append(np.asarray(multihost_utils.process_allgather(images, tiled=True))[:len(chunk)])
    return np.clip(np.concatenate(out), -1.0, 1.0)


def methods(objective, ev) -> list:
    """[(NFE, sampling.Method)] this stage is scored at."""
    if objective.sampler == "ode":
        return [(sampling.nfe(s), sampling.ode(s, ev.teacher_solver)) for s in ev.teacher_steps]
    return [(1, sampling.one_step(objective.sigma_d)),
            (2, sampling.two_step(objective.sigma_d, ev.t_mid))]


def evaluate_all(config, workdir, *, log=print) -> dict:
    """Evaluates every model with a checkpoint in `workdir`; returns the results dict."""
    if config.data.name != "digits":
        raise ConfigError(f"stage=eval evaluates the digits experiment only; FID / FD-DINOv2 "
                          f"for data.name={config.data.name!r} is not built yet")
    primary = files.is_primary()
    say = log if primary else (lambda msg: None)
    ev = config.eval
    stages = [s for s in config.pipeline if s in configs.training_stages(config)]
    found = {s: ckpt.has_checkpoint(ckpt.stage_dir(config, s, workdir)) for s in stages}
    if not any(found.values()):
        raise MissingInputError(f"nothing to evaluate: no stage of {tuple(stages)} has a "
                                f"checkpoint under {workdir}; train one first (e.g. stage=all)")
    say("=== stage eval ===")
    eval_dir, sample_dir = files.join(workdir, "eval"), files.join(workdir, "samples")

    splits = load_digits_splits(config.data.holdout)
    start = time.time()
    clf = load_or_train_classifier(eval_dir / "digits_classifier.msgpack",
                                   splits["train_images"], splits["train_labels"], seed=0,
                                   save=primary,
                                   **({"steps": ev.classifier_steps} if ev.classifier_steps
                                      else {}))
    clf_acc = float(np.mean(classifier_predict(clf, splits["holdout_images"])
                            == splits["holdout_labels"]))
    say(f"[eval] digits classifier: held-out accuracy {clf_acc:.4f} ({time.time() - start:.0f}s)")
    evaluator = DigitsEvaluator(splits["train_images"], splits["train_labels"], clf)

    mesh = sharding.make_mesh(config.mesh)
    devices = sharding.batch_devices(mesh)
    batch_size = -(-ev.batch_size // devices) * devices   # a whole share for every device
    n = ev.num_samples
    conditional = config.model.num_classes > 0
    labels = (np.arange(n) % max(config.model.num_classes, 1)).astype(np.int32)
    key = jax.random.PRNGKey(ev.seed)
    # The Frechet distance is biased upward at small N, so every model is also scored on its first
    # `holdout` samples: that column is comparable with the real-data floor (held-out vs train).
    n_small = len(splits["holdout_images"])
    floor = evaluator.evaluate(splits["holdout_images"], splits["holdout_labels"])
    rows = [dict(model="data (held-out)", nfe=0, fd_small=floor["fd"], **floor)]

    for name in stages:
        if not found[name]:
            say(f"[eval] skipping {name}: no checkpoint in {ckpt.stage_dir(config, name, workdir)}")
            continue
        objective = objectives.build(config, name)
        params, _ = ckpt.restore_stage_ema(config, name, workdir, mesh)
        model = objective.model_cfg
        for nfe, method in methods(objective, ev):
            t0 = time.time()
            draw = sampling.sampler(objective.net_eval, data_shape(config.data),
                                    objective.sigma_d, method, num_classes=model.num_classes,
                                    guidance_input=model.guidance_input,
                                    scale=float(ev.guidance_scale),
                                    out_sharding=sharding.replicated(mesh))
            images = _generate(draw, params, batch_size, labels,
                               jax.random.fold_in(key, len(rows)), mesh)
            if primary:
                files.save_npz(sample_dir / f"{name}_{nfe}.npz", images=images.astype(np.float32),
                               **({"labels": labels} if conditional else {}))
            scores = evaluator.evaluate(images, labels if conditional else None)
            small = evaluator.evaluate(images[:n_small], labels[:n_small] if conditional else None)
            rows.append(dict(model=name, nfe=nfe, fd_small=small["fd"], **scores))
            say(f"[eval] {name:8s} NFE {nfe:3d}: FD {scores['fd']:.3f} ({time.time() - t0:.0f}s)")

    results = dict(classifier_holdout_accuracy=clf_acc, num_samples=n, small_n=n_small,
                   guidance_scale=ev.guidance_scale, rows=rows)
    diffusion_rows = [r for r in rows[1:] if config[r["model"]].objective == "diffusion"]
    if diffusion_rows:
        best = max(diffusion_rows, key=lambda r: r["nfe"])
        for r in rows[1:]:
            r["fd_vs_teacher"] = r["fd"] / best["fd"] if best["fd"] > 0 else None
    if primary:
        files.write_json(files.join(workdir, "results.json"), results)
    say(format_table(results))
    return results


def format_table(results: dict) -> str:
    """A markdown table of the results (also pasted into the README)."""
    lines = [f"| model | NFE | FD | FD / teacher | FD ({results['small_n']}) | accuracy | "
             "precision | recall |", "|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        ratio = r.get("fd_vs_teacher")  # None for an evaluation without a teacher
        acc = r.get("accuracy")
        lines.append(
            f"| {r['model']} | {r['nfe'] or '-'} | {r['fd']:.3f} | "
            f"{'-' if ratio is None else f'{ratio:.2f}'} | {r['fd_small']:.3f} | "
            f"{'-' if acc is None else f'{acc:.3f}'} | "
            f"{r['precision']:.3f} | {r['recall']:.3f} |")
    lines.append(f"\nDigits classifier held-out accuracy: {results['classifier_holdout_accuracy']:.4f}; "
                 f"{results['num_samples']} samples per model.")
    return "\n".join(lines)
