"""The evaluation stage: sample every trained model, score it, write the table.

For the digits experiment: the teacher at each NFE of `config.eval.teacher_steps` (2N - 1
evaluations for N solver steps), each CM (sCD, sCT, dsCD) at 1 and 2 steps (t_mid =
config.eval.t_mid), and the held-out real split as the floor. Each model's samples are saved as
`<workdir>/samples/<model>_<nfe>.npz` (key `images`, [N, 8, 8, 1] in [-1, 1], the scale the models
are trained on; key `labels`, [N]). Scores: Frechet distance in the features of the package's
digits classifier, that classifier's accuracy on the class-conditional samples, and k-NN (k=3)
precision/recall. Results go to `<workdir>/results.json` and are printed as a table.
"""
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from scm_jax import sampling
from scm_jax import train
from scm_jax import train_step as ts
from scm_jax.checkpoint import write_json_atomic
from scm_jax.data import load_digits_splits
from scm_jax.evaluation import DigitsEvaluator, classifier_predict, load_or_train_classifier

CM_STAGES = ("scd", "sct", "dscd")


def _sampler(config, stage: ts.Stage, params, *, steps: int | None, times=None):
    """A jitted (key, labels) -> images for one model and one NFE setting."""
    sigma_d = float(config.data.sigma_d)
    scale = float(config.eval.guidance_scale)
    null = config.model.num_classes

    def F_fn_for(labels):
        n = labels.shape[0]
        base = {}
        if config.model.guidance_input:
            base["guidance"] = jnp.full((n,), scale, jnp.float32)

        def with_labels(x, t, y):
            return stage.net_eval(params, x, t, dict(base, y=y) if null else base)

        if null and scale != 1.0 and not config.model.guidance_input:
            return sampling.guided_fn(with_labels, labels, null, scale)
        return lambda x, t: with_labels(x, t, labels if null else None)

    shape = train.image_shape(config)

    @jax.jit
    def sample(key, labels):
        F_fn = F_fn_for(labels)
        full = (labels.shape[0],) + tuple(shape)
        if times is not None:
            return sampling.cm_sample(F_fn, key, full, sigma_d, times)
        return sampling.teacher_sample(F_fn, key, full, sigma_d, num_steps=steps,
                                       solver=config.eval.teacher_solver)

    return sample


def _generate(sample, config, labels, key):
    out = []
    bs = config.eval.batch_size
    for i, start in enumerate(range(0, len(labels), bs)):
        chunk = labels[start:start + bs]
        pad = bs - len(chunk)
        padded = np.concatenate([chunk, np.zeros(pad, chunk.dtype)]) if pad else chunk
        images = sample(jax.random.fold_in(key, i), jnp.asarray(padded))
        out.append(np.asarray(images)[:len(chunk)])
    return np.clip(np.concatenate(out), -1.0, 1.0)


def evaluate_all(config, workdir: str, *, log=print) -> dict:
    """Evaluates every model with a checkpoint in `workdir`; returns the results dict."""
    if config.data.name != "digits":
        raise ValueError(f"the evaluation stage supports data.name='digits', got {config.data.name!r}")
    log("=== stage eval ===")
    eval_dir = os.path.join(workdir, "eval")
    sample_dir = os.path.join(workdir, "samples")
    os.makedirs(eval_dir, exist_ok=True)
    os.makedirs(sample_dir, exist_ok=True)

    splits = load_digits_splits(config.data.holdout)
    start = time.time()
    clf = load_or_train_classifier(os.path.join(eval_dir, "digits_classifier.msgpack"),
                                   splits["train_images"], splits["train_labels"], seed=0,
                                   **({"steps": config.eval.classifier_steps}
                                      if config.eval.classifier_steps else {}))
    clf_acc = float(np.mean(classifier_predict(clf, splits["holdout_images"])
                            == splits["holdout_labels"]))
    log(f"[eval] digits classifier: held-out accuracy {clf_acc:.4f} ({time.time() - start:.0f}s)")
    evaluator = DigitsEvaluator(splits["train_images"], splits["train_labels"], clf)

    n = config.eval.num_samples
    labels = (np.arange(n) % max(config.model.num_classes, 1)).astype(np.int32)
    key = jax.random.PRNGKey(config.eval.seed)
    # The Frechet distance is biased upward at small N, so every model is also scored on its first
    # `holdout` samples: that column is comparable with the real-data floor (held-out vs train).
    n_small = len(splits["holdout_images"])
    floor = evaluator.evaluate(splits["holdout_images"], splits["holdout_labels"])
    rows = [dict(model="data (held-out)", nfe=0, fd_small=floor["fd"], **floor)]

    def run(model: str, nfe: int, sample):
        t0 = time.time()
        images = _generate(sample, config, labels, jax.random.fold_in(key, len(rows)))
        path = os.path.join(sample_dir, f"{model}_{nfe}.npz")
        np.savez(path + ".tmp.npz", images=images.astype(np.float32),
                 **({"labels": labels} if config.model.num_classes else {}))
        os.replace(path + ".tmp.npz", path)
        conditional = config.model.num_classes > 0
        scores = evaluator.evaluate(images, labels if conditional else None)
        small = evaluator.evaluate(images[:n_small], labels[:n_small] if conditional else None)
        rows.append(dict(model=model, nfe=nfe, fd_small=small["fd"], **scores))
        log(f"[eval] {model:8s} NFE {nfe:3d}: FD {scores['fd']:.3f} "
            f"({time.time() - t0:.0f}s)")

    def ema_or_none(name):
        try:
            return train.restore_stage_ema(config, name, workdir)[0]
        except FileNotFoundError as err:
            log(f"[eval] skipping {name}: {err}")
            return None

    params = ema_or_none("teacher")
    if params is not None:
        stage = ts.build_stage(config, "teacher")
        for steps in config.eval.teacher_steps:
            run("teacher", sampling.nfe(steps), _sampler(config, stage, params, steps=steps))
    sigma_d = float(config.data.sigma_d)
    for name in CM_STAGES:
        params = ema_or_none(name)
        if params is None:
            continue
        stage = ts.build_stage(config, name)
        run(name, 1, _sampler(config, stage, params, steps=None,
                              times=sampling.one_step_times(sigma_d)))
        run(name, 2, _sampler(config, stage, params, steps=None,
                              times=sampling.two_step_times(sigma_d, config.eval.t_mid)))

    results = dict(classifier_holdout_accuracy=clf_acc, num_samples=n, small_n=n_small,
                   guidance_scale=config.eval.guidance_scale, rows=rows)
    teacher_rows = [r for r in rows if r["model"] == "teacher"]
    if teacher_rows:
        best = max(teacher_rows, key=lambda r: r["nfe"])
        for r in rows[1:]:
            r["fd_vs_teacher"] = r["fd"] / best["fd"] if best["fd"] > 0 else None
    write_json_atomic(os.path.join(workdir, "results.json"), results)
    log(format_table(results))
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
