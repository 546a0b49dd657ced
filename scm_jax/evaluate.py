"""The evaluation stage: sample every trained model every way the config asks, score it, write
the table.

For every training stage of `config.pipeline` with a checkpoint (its EMA), every sampler of
`plan` (a diffusion model at each solver length of `eval.teacher_steps`, a consistency model at
each M of `eval.consistency_steps`: 1 step, 2 steps with t_mid, multistep) and every guidance
scale of `eval.guidance_scales` when the model is guided, `eval.num_samples` samples are drawn
over every device of `config.mesh` and every process, `eval.batch_size` at a time, each chunk
from the row's key folded with the chunk's index (so no two chunks share noise, and the samples
do not depend on the number of processes), class labels cycling through the classes. The
scorer (`evaluation.evaluators`) turns them into FID / FD-DINOv2 / precision / recall (the
paper's datasets) or the digits classifier's scores.

Outputs (primary process): `<workdir>/results.json` (rewritten after every row: a re-run skips
the rows it holds and resumes an interrupted row from `eval/<row>.partial.npz`), the table
printed at the end, a PNG grid per row in `<workdir>/eval/`, and samples in
`<workdir>/samples/` (digits: `<stage>_<nfe>[_g<scale>].npz`, images [N, 8, 8, 1] in [-1, 1] and
labels [N]; other datasets with `eval.save_samples`: uint8 chunks `<row>/<chunk>.npz`).
"""
import time

import jax
import numpy as np

from scm_jax import checkpoint as ckpt
from scm_jax import (configs, files, objectives, sampling, sharding, stage_identity,
                     stage_restore)
from scm_jax.data import data_shape
from scm_jax.errors import MissingInputError
from scm_jax.evaluation import evaluators
from scm_jax.metrics_log import save_image_grid


def guide_stage_for(config, name: str) -> str | None:
    """The guiding network of diffusion stage `name`: the stage a student distilling `name`
    takes its guidance's unconditional branch from (`guidance.network`), or None (CFG)."""
    from scm_jax import configs

    for stage in configs.training_stages(config):
        st = config[stage]
        network = st.get("guidance", {}).get("network", "") if "guidance" in st else ""
        if network and st.get("teacher_stage") == name:
            return network
    return None


def guidance_scales(objective, ev, guided_by_network: bool = False) -> tuple:
    """The scales a model is sampled at: `ev.guidance_scales` for a student trained over a range
    of scales with the scale as its input and for a teacher trained with label dropout
    (classifier-free guidance), else 1 (a student distilled at one fixed scale has it built in:
    sampling it with CFG on top would guide twice)."""
    model = objective.model_cfg
    if not sampling.solves_ode(objective):
        g = objective.cfg.guidance
        guided = (getattr(objective, "guided", False) and model.guidance_input
                  and g.scale_min != g.scale_max)
    else:
        guided = guided_by_network or (model.num_classes > 0
                                       and objective.cfg.get("label_dropout", 0.0) > 0)
    return tuple(float(s) for s in ev.guidance_scales) if guided else (1.0,)


def distilled_scale(objective, scale: float) -> float:
    """The guidance a row's samples carry: the sampling scale, or the one fixed scale a student
    without the scale input was distilled at."""
    g = objective.cfg.get("guidance")
    fixed = g is not None and g.scale_min == g.scale_max and not objective.model_cfg.guidance_input
    if fixed and not sampling.solves_ode(objective):
        return float(g.scale_min)
    return scale


def plan(objective, ev, guided_by_network: bool = False) -> list:
    """[(sampling.Method, guidance scale)] a stage is scored at, in table order."""
    steps = ev.teacher_steps if sampling.solves_ode(objective) else ev.consistency_steps
    methods = [sampling.method_for(objective, int(s), t_mid=ev.t_mid, solver=ev.teacher_solver)
               for s in steps]
    return [(m, s) for m in methods for s in guidance_scales(objective, ev, guided_by_network)]


def row_id(stage: str, method, scale: float, sigma_rel: float = 0.0, guide: str = "") -> str:
    """'<stage>_<nfe>' (+ '_g<scale>' when guided, + '_by<guide>' when a guiding network is the
    unconditional branch, + '_ema<sigma_rel>' for a post-hoc EMA): the row's file names."""
    return (f"{stage}_{method.nfe}" + ("" if scale == 1.0 else f"_g{scale:g}")
            + (f"_by{guide}" if guide and scale != 1.0 else "")
            + (f"_ema{sigma_rel:g}" if sigma_rel else ""))


def class_labels(n: int, num_classes: int) -> np.ndarray:
    """[n] labels cycling through the classes (balanced), zeros for an unconditional model."""
    return (np.arange(n) % max(num_classes, 1)).astype(np.int32)


def chunk_generator(draw, params, labels: np.ndarray, batch_size: int, key, mesh):
    """generate(i) -> the i-th chunk of samples (the last padded to batch_size), drawn over the
    mesh from fold_in(key, i), the same global array on every process."""
    split, repl = sharding.batch_sharded(mesh), sharding.replicated(mesh)

    def generate(i: int):
        chunk = labels[i * batch_size:(i + 1) * batch_size]
        pad = batch_size - len(chunk)
        padded = np.concatenate([chunk, np.zeros(pad, chunk.dtype)]) if pad else chunk
        return draw(params, jax.device_put(jax.random.fold_in(key, i), repl),
                    jax.device_put(padded, split))

    return generate


def in_loop(config, name: str, objective, mesh, workdir, *, log=print):
    """score(ema_params, step) -> scores of `eval.in_loop_samples` samples (None when
    config.<name>.eval_every is 0): what training logs every `eval_every` steps. A diffusion
    model is sampled with the first solver length of `eval.teacher_steps`, a consistency model
    in 2 steps (1 when `eval.consistency_steps` has no 2), at the first guidance scale."""
    if config[name].eval_every <= 0:
        return None
    ev = config.eval
    primary = files.is_primary()
    scorer = evaluators.from_config(ev, config.data, mesh, eval_dir=files.join(workdir, "eval"),
                                    log=log if primary else (lambda m: None), primary=primary)
    steps = (ev.teacher_steps[0] if sampling.solves_ode(objective)
             else 2 if 2 in ev.consistency_steps else 1)
    method = sampling.method_for(objective, steps, t_mid=ev.t_mid, solver=ev.teacher_solver)
    model = objective.model_cfg
    scale = guidance_scales(objective, ev)[0]
    draw = sampling.sampler(objective.net_eval, data_shape(config.data), objective.sigma_d,
                            method, num_classes=model.num_classes,
                            guidance_input=model.guidance_input, scale=scale,
                            out_sharding=sharding.replicated(mesh))
    devices = sharding.batch_devices(mesh)
    batch_size = -(-ev.batch_size // devices) * devices
    n = ev.in_loop_samples
    labels = class_labels(n, model.num_classes)
    conditional = model.num_classes > 0

    def score(params, step: int) -> dict:
        # The same noise at every evaluation, so successive scores differ by the model only.
        generate = chunk_generator(draw, params, labels, batch_size,
                                   jax.random.PRNGKey(ev.seed), mesh)
        return scorer.score(generate, n, batch_size, labels=labels if conditional else None)

    return score


def evaluate_all(config, workdir, *, log=print, stages=None, scorer=None) -> dict:
    """Evaluates every model with a checkpoint in `workdir`; returns the results dict.

    stages: the training stages to score (default: those of config.pipeline); scorer: an
    `evaluators.from_config` scorer to reuse (the studies score many runs with one).
    """
    primary = files.is_primary()
    say = log if primary else (lambda msg: None)
    ev = config.eval
    if stages is None:
        stages = [s for s in config.pipeline if s in configs.training_stages(config)]
    found = {s: ckpt.has_checkpoint(stage_identity.stage_dir(config, s, workdir)) for s in stages}
    if not any(found.values()):
        raise MissingInputError(f"nothing to evaluate: no stage of {tuple(stages)} has a "
                                f"checkpoint under {workdir}; train one first (e.g. stage=all)")
    say("=== stage eval ===")
    eval_dir, sample_dir = files.join(workdir, "eval"), files.join(workdir, "samples")
    mesh = sharding.make_mesh(config.mesh)
    if scorer is None:
        scorer = evaluators.from_config(ev, config.data, mesh, eval_dir=eval_dir, log=say,
                                        primary=primary)
    devices = sharding.batch_devices(mesh)
    batch_size = -(-ev.batch_size // devices) * devices   # a whole share for every device
    n = ev.num_samples
    labels = class_labels(n, config.model.num_classes)
    conditional = config.model.num_classes > 0
    key = jax.random.PRNGKey(ev.seed)
    results_path = files.join(workdir, "results.json")
    done = {}
    if files.exists(results_path):
        previous = files.read_json(results_path)
        if previous.get("num_samples") == n:   # rows of the same evaluation: keep them
            done = {r["id"]: r for r in previous.get("rows", []) if "id" in r}
    rows = list(scorer.baseline_rows())

    def finish(results):
        if primary:
            files.write_json(results_path, results)

    summary = dict(num_samples=n, batch_size=batch_size, seed=ev.seed, rows=rows,
                   **scorer.summary())
    for name in stages:
        if not found[name]:
            where = stage_identity.stage_dir(config, name, workdir)
            say(f"[eval] skipping {name}: no checkpoint in {where}")
            continue
        objective = objectives.build(config, name)
        sigma_rel = float(ev.get("sigma_rel", 0.0))
        params, step = stage_restore.restore_stage_ema(config, name, workdir, mesh,
                                                       sigma_rel=sigma_rel)
        model = objective.model_cfg
        guide_name = guide_stage_for(config, name) if sampling.solves_ode(objective) else None
        guide = None
        if guide_name:   # EDM2's guidance: the guiding network is the unconditional branch
            guide_objective = objectives.build(config, guide_name)
            guide_params, _ = stage_restore.restore_stage_ema(config, guide_name, workdir, mesh)
            params = dict(net=params, guide=guide_params)
            guide = (guide_objective.net_eval, guide_objective.model_cfg.num_classes > 0)
            say(f"[eval] {name}: guided by the network of stage {guide_name}")
        for method, scale in plan(objective, ev, guided_by_network=guide is not None):
            rid = row_id(name, method, scale, sigma_rel, guide_name or "")
            if rid in done:
                rows.append(done[rid])
                say(f"[eval] {rid}: done before")
                continue
            t0 = time.time()
            draw = sampling.sampler(objective.net_eval, data_shape(config.data), objective.sigma_d,
                                    method, num_classes=model.num_classes,
                                    guidance_input=model.guidance_input, scale=scale,
                                    out_sharding=sharding.replicated(mesh), guide=guide)
            generate = chunk_generator(draw, params, labels, batch_size,
                                       jax.random.fold_in(key, _stable_hash(rid)), mesh)
            sink = _sink(config, rid, eval_dir, sample_dir, labels if conditional else None,
                         primary, batch_size)
            scores = scorer.score(
                generate, n, batch_size, labels=labels if conditional else None,
                state_path=eval_dir / f"{rid}.partial.npz", sink=sink,
                wants_images=lambda i: ev.save_samples or (i == 0 and ev.grid_samples > 0),
                log=lambda m, rid=rid: say(f"[eval] {rid}: {m}"))
            rows.append(dict(id=rid, model=name, checkpoint_step=step, nfe=method.nfe,
                             **({"ema_sigma_rel": sigma_rel} if sigma_rel else {}),
                             **({"guided_by": guide_name} if guide_name and scale != 1.0
                                else {}),
                             sampler=_describe(method),
                             guidance=distilled_scale(objective, scale), **scores))
            say(f"[eval] {rid}: " + ", ".join(f"{k} {scores[k]:.3f}" for k in
                                              ("fd", "fid", "fd_dinov2") if k in scores)
                + f" ({time.time() - t0:.0f}s)")
            finish(summary)
    # Every row relative to the teacher's best score at its longest solver setting.
    metric = scorer.metric
    teacher_rows = [r for r in rows if r["id"] != "data" and metric in r
                    and sampling.solves_ode(objectives.get(config[r["model"]].objective))]
    if teacher_rows:
        longest = max(r["nfe"] for r in teacher_rows)
        best = min((r for r in teacher_rows if r["nfe"] == longest), key=lambda r: r[metric])
        for r in rows:
            if r["id"] != "data" and metric in r and best[metric] > 0:
                r[f"{metric}_vs_teacher"] = r[metric] / best[metric]
    finish(summary)
    say(format_table(summary))
    return summary


def _stable_hash(text: str) -> int:
    import zlib

    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def _describe(method) -> str:
    if method.kind == "ode":
        return f"{method.solver} {method.steps} steps"
    return f"{len(method.times)}-step, t = " + ", ".join(f"{t:.3f}" for t in method.times)


def _sink(config, rid, eval_dir, sample_dir, labels, primary, batch_size):
    """sink(chunk, images): the row's PNG grid from chunk 0 and, when asked, its samples."""
    ev, digits = config.eval, config.data.name == "digits"

    def sink(chunk: int, images: np.ndarray) -> None:
        if not primary:
            return
        if chunk == 0 and ev.grid_samples > 0:
            grid = images[:ev.grid_samples]
            rows = max(1, int(np.sqrt(len(grid))))
            if digits:
                save_image_grid(grid, eval_dir / f"{rid}.png", rows=rows)
            else:
                save_image_grid(grid.astype(np.float32), eval_dir / f"{rid}.png", rows=rows,
                                low=0.0, high=255.0, scale=1)
        if digits:   # the whole (small) set at once
            files.save_npz(sample_dir / f"{rid}.npz", images=images.astype(np.float32),
                           **({"labels": labels} if labels is not None else {}))
        elif ev.save_samples:
            start = chunk * batch_size
            files.save_npz(sample_dir / rid / f"{chunk:05d}.npz", images=images,
                           **({"labels": labels[start:start + len(images)]}
                              if labels is not None else {}))

    return sink


def format_table(results: dict) -> str:
    """A markdown table of the results (also pasted into docs/results.md)."""
    rows = results["rows"]
    if "small_n" in results:   # digits
        head = (f"| model | NFE | guidance | FD | FD / teacher | FD ({results['small_n']}) | "
                "accuracy | precision | recall |")
        cols = ("fd", "fd_vs_teacher", "fd_small", "accuracy", "precision", "recall")
    else:
        head = "| model | NFE | guidance | FID | FID / teacher | FD-DINOv2 | precision | recall |"
        cols = ("fid", "fid_vs_teacher", "fd_dinov2", "precision", "recall")
    lines = [head, "|" + "---|" * (3 + len(cols))]
    for r in rows:
        model = r["model"] + (f" (EMA {r['ema_sigma_rel']:g})" if r.get("ema_sigma_rel") else "")
        cells = [model, str(r["nfe"] or "-"), f"{r.get('guidance', 1.0):g}"]
        for c in cols:
            v = r.get(c)
            cells.append("-" if v is None else f"{v:.2f}" if c.endswith("teacher") else
                         f"{v:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    if "classifier_holdout_accuracy" in results:
        lines.append(f"\nDigits classifier held-out accuracy: "
                     f"{results['classifier_holdout_accuracy']:.4f}; {results['num_samples']} "
                     f"samples per model.")
    else:
        lines.append(f"\n{results['num_samples']} samples per row; reference: "
                     f"{results.get('reference', '')}.")
    return "\n".join(lines)
