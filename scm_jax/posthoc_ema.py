"""Post-hoc EMA: the power EMA of any sigma_rel, rebuilt after training from stored snapshots.

    python -m scm_jax.posthoc_ema --config=experiments/digits.py --workdir=DIR --stage=teacher \
        --sigma_rel=0.015,0.05,0.1 [--step=N]

reads the snapshots the stage took while training (`<stage>.ema.posthoc_sigma_rels`, every
`<stage>.ema.posthoc_every` steps: `scm_jax.posthoc_store`), solves for each sigma_rel the
least-squares combination below at step N (default: the last snapshot's), and writes each EMA
as `DIR/<stage>/posthoc_ema/sigma_rel_<s>/`, which students (`--config.scd.teacher_sigma_rel=s`)
and the evaluation (`--config.eval.sigma_rel=s`) then load. Run it as one process: it reads
every snapshot with a non-zero coefficient, one at a time, and sums in float64 on the host
(8 bytes per parameter per sigma_rel asked for).

EDM2 (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models",
Sec. 3 and App. C; NVlabs/edm2 `training/phema.py`) tracks two power EMAs during training
(`scm_jax.ema`, kind 'power', e.g. sigma_rel 0.05 and 0.10) and stores snapshots of them every K
steps. Every EMA is linear in the parameter trajectory, EMA_T = sum_i w_i theta_i, so the EMA of
another sigma_rel at step T is approximated by sum_k x_k snapshot_k whose profile sum_k x_k w^(k)
is closest, in least squares, to the target profile: A x = b with the Gram matrix
A_kl = <w^(k), w^(l)> and b_k = <w^(k), w^target>, solved here in float64 under the constraint
sum_k x_k = 1 (so a constant trajectory is reproduced exactly; EDM2 rescales x to sum 1 instead).

Profile. `scm_jax.ema` updates ema <- beta_t ema + (1 - beta_t) theta_t with beta_t = (1 - 1/t)^a,
a = gamma + 1 and t = 1, 2, ... (theta_t: params after optimizer step t; a "step" below is
`TrainState.step` after the update, i.e. the number of EMA updates so far). The product
telescopes, so the weight of theta_i in the EMA after T updates is

    w_i = (1 - beta_i) prod_{j=i+1..T} beta_j = (i^a - (i-1)^a) / T^a,   i = 1..T,

which is EDM2's continuous profile p(t) = a t^(a-1) / T^a integrated over step i's slot (i-1, i].
EDM2's closed-form inner products int p p' dt treat the trajectory as continuous; the discrete
sum_i w_i w'_i differ by a relative ~a^2 / (12 T^2) (6e-6 at a = 18, T = 2000, but 2.5e-3 for a
snapshot at T = 100), enough that with 10 snapshots per sigma_rel the continuous Gram gave 2-5x
larger reconstruction errors for sigma_rel 0.15 in our tests. We use the exact discrete inner
products of the package's own update, since they are cheap: for each pair of distinct exponents
(a, b) one running log-sum-exp over i = 1..T_max gives every prefix sum sum_{i<=m} w_i w'_i
(O(T_max) time and memory per pair; a few pairs in practice; ~0.2 s per pair at 1e6 steps).
Snapshots after the target step, or at step 0, get coefficient 0 (as EDM2).

Error to expect. The target profile is not in the span of the snapshots' profiles, so the
reconstruction is not exact. With snapshots of sigma_rel 0.05 and 0.10 every T/20 steps, the
rebuilt EMA of 0.07 / 0.15 at step T deviates from the directly tracked one by <= 6e-4 / 1.1e-3
of |EMA_0.05 - EMA_0.10| on random walks of 2000 steps (<= 5e-3 / 8e-3 at T/2, 10 snapshots
each); `profile_error` gives the trajectory-free relative L2 error of the profile (2.5e-3 /
5.8e-3 there). Beyond that residual the model is exact: the error equals the residual profile
applied to the trajectory within 1e-5 of that distance (float32 EMA arithmetic). The package
computes 1 - beta_t directly to float32's relative precision (`ema.ema_weight`, tested against
float64 up to 1e7 steps), so its profile is the one modelled here at any run length (forming
beta_t first in float32 would bend it by a relative 1.5e-2 at 1e6 steps).
Steps where `nonfinite.skip` skipped the update are not modelled.
"""
import sys

import numpy as np

import jax

from scm_jax.ema import MAX_SIGMA_REL, power_ema_exponent


def _plain(value):
    """numpy scalars as Python numbers, so messages read `x = 0.3`, not `x = np.float64(0.3)`."""
    return value.item() if isinstance(value, np.generic) else value


def _exponent(sigma_rel: float, name: str) -> float:
    """a = gamma + 1 of the power EMA of `sigma_rel`; ValueError naming `name` when invalid."""
    if not 0.0 < float(sigma_rel) < MAX_SIGMA_REL:
        raise ValueError(f"{name} = {_plain(sigma_rel)!r} is invalid: a power EMA's sigma_rel "
                         f"must be in (0, {MAX_SIGMA_REL})")
    return power_ema_exponent(float(sigma_rel)) + 1.0


def _log_increments(a: float, n: int) -> np.ndarray:
    """[n] log(1 - (1 - 1/i)^a) for i = 1..n, i.e. log(w_i T^a / i^a)."""
    i = np.arange(2, n + 1, dtype=np.float64)
    return np.concatenate([[0.0], np.log(-np.expm1(a * np.log1p(-1.0 / i)))])[:n]


def snapshot_profile(step: int, sigma_rel: float, length: int | None = None) -> np.ndarray:
    """[length] float64 weights w_i (i = 1..length) of theta_i in the power EMA after `step`
    updates; zero beyond `step`. length defaults to `step`. The weights sum to 1."""
    a = _exponent(sigma_rel, "sigma_rel")
    length = int(step) if length is None else int(length)
    n = min(int(step), length)
    out = np.zeros(length)
    i = np.arange(1, n + 1, dtype=np.float64)
    out[:n] = np.exp(a * np.log(i / step) + _log_increments(a, n))
    return out


def _inner_products(a: float, b: float, steps_a: np.ndarray, steps_b: np.ndarray) -> np.ndarray:
    """<w(T_a, a), w(T_b, b)> = sum_{i <= min(T_a, T_b)} w_i w'_i for broadcast step arrays."""
    m = np.minimum(steps_a, steps_b)
    n = int(m.max())
    i = np.arange(1, n + 1, dtype=np.float64)
    log_terms = (a + b) * np.log(i / n) + _log_increments(a, n) + _log_increments(b, n)
    log_prefix = np.logaddexp.accumulate(log_terms)           # log sum_{i<=m} (i/n)^(a+b) c_a c_b
    return np.exp(log_prefix[m - 1] + a * np.log(n / steps_a) + b * np.log(n / steps_b))


def _system(snapshot_steps, snapshot_sigma_rels, target_step, target_sigma_rel):
    """Validates; returns (keep [N] bool, A [M, M], b [M], c = <target, target>) over the M kept."""
    steps = np.asarray(snapshot_steps)
    sigmas = np.asarray(snapshot_sigma_rels, dtype=np.float64)
    if steps.ndim != 1 or steps.size == 0:
        raise ValueError(f"snapshot_steps = {snapshot_steps!r} is invalid: expected a non-empty "
                         f"1-D list of steps")
    if sigmas.shape != steps.shape:
        raise ValueError(f"snapshot_sigma_rels has shape {sigmas.shape}; expected one per "
                         f"snapshot step, {steps.shape}")
    if not np.all(np.round(steps) == steps) or steps.min() < 0:
        raise ValueError(f"snapshot_steps = {steps.tolist()} is invalid: expected integers >= 0")
    steps = steps.astype(np.int64)
    if int(target_step) != target_step or not 1 <= target_step <= steps.max():
        raise ValueError(f"target_step = {_plain(target_step)!r} is invalid: expected an integer "
                         f"in [1, {steps.max()}] (the last snapshot's step)")
    target_step = int(target_step)
    a_target = _exponent(target_sigma_rel, "target_sigma_rel")
    exps = {}
    for k, s in enumerate(sigmas):
        exps.setdefault(float(s), _exponent(s, f"snapshot_sigma_rels[{k}]"))
    keep = (steps >= 1) & (steps <= target_step)
    steps, sigmas = steps[keep], sigmas[keep]
    A = np.zeros((steps.size, steps.size))
    b = np.zeros(steps.size)
    for u in np.unique(sigmas):
        rows = np.flatnonzero(sigmas == u)
        b[rows] = _inner_products(exps[u], a_target, steps[rows], np.int64(target_step))
        for v in np.unique(sigmas[sigmas >= u]):
            cols = np.flatnonzero(sigmas == v)
            block = _inner_products(exps[u], exps[v], steps[rows, None], steps[None, cols])
            A[np.ix_(rows, cols)] = block
            A[np.ix_(cols, rows)] = block.T
    c = float(_inner_products(a_target, a_target, np.int64(target_step), np.int64(target_step)))
    return keep, A, b, c


def solve_coefficients(snapshot_steps, snapshot_sigma_rels, target_step: int,
                       target_sigma_rel: float) -> np.ndarray:
    """[N] float64 coefficients x, summing to 1, such that sum_k x_k snapshot_k approximates the
    power EMA of `target_sigma_rel` after `target_step` updates.

    snapshot_steps: [N] ints, the `TrainState.step` at which each snapshot was stored;
    snapshot_sigma_rels: [N] floats, the sigma_rel of each tracked EMA. Snapshots with step 0 or
    after `target_step` get 0. Best at a snapshot step (the profile ends exactly there).
    Raises ValueError naming the value for no snapshots, a target step outside
    [1, last snapshot step], or a sigma_rel outside (0, MAX_SIGMA_REL).
    """
    keep, A, b, _ = _system(snapshot_steps, snapshot_sigma_rels, target_step, target_sigma_rel)
    steps = np.asarray(snapshot_steps, np.int64)
    rels = np.asarray(snapshot_sigma_rels, np.float64)
    exact = np.flatnonzero((steps == int(target_step)) & (rels == float(target_sigma_rel)))
    if exact.size:   # the target was tracked and stored at this step: that snapshot, exactly
        out = np.zeros(steps.size)
        out[exact[0]] = 1.0
        return out
    m = int(keep.sum())
    # KKT system of  min |W x - w_target|^2  s.t.  sum x = 1  (W: the kept snapshots' profiles).
    # Rows are scaled by 1/diag(A) first: entries span many orders of magnitude across steps.
    scale = 1.0 / np.sqrt(np.diag(A))
    kkt = np.zeros((m + 1, m + 1))
    kkt[:m, :m] = A * scale[:, None] * scale[None, :]
    kkt[:m, m] = kkt[m, :m] = scale
    rhs = np.concatenate([b * scale, [1.0]])
    y = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
    out = np.zeros(keep.size)
    out[keep] = y[:m] * scale
    return out


def profile_error(snapshot_steps, snapshot_sigma_rels, target_step: int, target_sigma_rel: float,
                  coefficients) -> float:
    """|sum_k x_k w^(k) - w^target| / |w^target| (L2 over steps): the reconstruction's relative
    error for a trajectory of independent per-step parameters; a trajectory-free quality measure."""
    keep, A, b, c = _system(snapshot_steps, snapshot_sigma_rels, target_step, target_sigma_rel)
    x = np.asarray(coefficients, dtype=np.float64)[keep]
    return float(np.sqrt(max(x @ A @ x - 2.0 * x @ b + c, 0.0) / c))


def reconstruct(snapshots, coefficients):
    """sum_k x_k snapshots[k], leaf by leaf: numpy or jax leaves, float64 accumulation on the host,
    float32 numpy leaves out. Snapshots whose coefficient is 0 are skipped (not even read)."""
    x = np.asarray(coefficients, dtype=np.float64)
    if x.ndim != 1 or len(snapshots) != x.size:
        raise ValueError(f"got {len(snapshots)} snapshots but coefficients of shape {x.shape}")
    total, treedef = None, None
    for k in np.flatnonzero(x):
        leaves, tdef = jax.tree.flatten(snapshots[k])
        if treedef is None:
            treedef, total = tdef, [np.zeros(np.shape(leaf)) for leaf in leaves]
        elif tdef != treedef:
            raise ValueError(f"snapshot {k} has tree structure {tdef}; expected {treedef}")
        for acc, leaf in zip(total, leaves):
            acc += x[k] * np.asarray(leaf, dtype=np.float64)
    if total is None:
        raise ValueError("all coefficients are 0: nothing to reconstruct")
    return jax.tree.unflatten(treedef, [acc.astype(np.float32) for acc in total])


# --- The command ---------------------------------------------------------------------------------
def reconstruct_stage(config, workdir, stage: str, sigma_rels, *, step: int = 0,
                      log=print) -> list[dict]:
    """Rebuilds the EMAs of `sigma_rels` of stage `stage` at `step` (0: the last snapshot's)
    from its snapshots and writes each where `stage_restore.restore_stage_ema(...,
    sigma_rel=s)` reads it. Returns one dict per sigma_rel (sigma_rel, step, profile_error,
    snapshots used, where). MissingInputError when the stage has no checkpoint or no
    snapshots; ConfigError for a sigma_rel or step outside what the snapshots allow."""
    from scm_jax import objectives, posthoc_store
    from scm_jax.checkpoint import has_checkpoint
    from scm_jax.data import data_shape
    from scm_jax.errors import ConfigError, MissingInputError
    from scm_jax.stage_identity import check_stage_config, stage_dir, stage_record

    if stage not in config or "objective" not in config[stage]:
        from scm_jax import configs

        raise ConfigError(f"--stage={stage!r} is not a training stage of the config; expected "
                          f"one of {configs.training_stages(config)}")
    directory = stage_dir(config, stage, workdir)
    objective = objectives.build(config, stage)
    if not has_checkpoint(directory):
        raise MissingInputError(f"no {stage} checkpoint found in {directory}: run stage={stage} "
                                f"first")
    check_stage_config(directory, stage_record(config, objective))
    snapshots = posthoc_store.snapshot_steps(directory)
    if not snapshots:
        raise MissingInputError(
            f"stage {stage} in {directory} took no post-hoc EMA snapshots: train it with "
            f"--config.{stage}.ema.posthoc_sigma_rels=0.05,0.1 --config.{stage}.ema."
            f"posthoc_every=K")
    steps = np.array([s for s, rels in snapshots for _ in rels], np.int64)
    rels = np.array([r for _, rs in snapshots for r in rs], np.float64)
    target = int(step) or int(steps.max())
    try:
        coefficients = np.stack([solve_coefficients(steps, rels, target, s) for s in sigma_rels])
        errors = [profile_error(steps, rels, target, s, x)
                  for s, x in zip(sigma_rels, coefficients)]
    except ValueError as err:
        raise ConfigError(f"{err} (snapshots of sigma_rel {sorted(set(rels.tolist()))} at steps "
                          f"{int(steps.min())}..{int(steps.max())})") from err
    abstract, _ = objective.abstract_state(data_shape(config.data))
    abstract_ema = abstract.nets["net"].ema
    leaves, treedef = jax.tree.flatten(abstract_ema)
    sums = [[np.zeros(leaf.shape, np.float64) for leaf in leaves] for _ in sigma_rels]
    column = 0
    for snap_step, snap_rels in snapshots:
        block = coefficients[:, column:column + len(snap_rels)]
        column += len(snap_rels)
        if not block.any():
            continue   # not read at all
        emas = posthoc_store.read_snapshot(directory, snap_step, abstract_ema, len(snap_rels))
        for k, ema in enumerate(emas):
            if not block[:, k].any():
                continue
            for leaf_sums, x in zip(sums, block[:, k]):
                if x:
                    for acc, value in zip(leaf_sums, jax.tree.leaves(ema)):
                        acc += x * np.asarray(value, np.float64)
    out = []
    for s, x, err, leaf_sums in zip(sigma_rels, coefficients, errors, sums):
        used = [[int(a), float(b), float(c)] for a, b, c in zip(steps, rels, x) if c]
        info = dict(sigma_rel=float(s), step=target, profile_error=float(err), snapshots=used)
        ema = jax.tree.unflatten(treedef, [a.astype(leaf.dtype) for a, leaf in
                                           zip(leaf_sums, leaves)])
        where = posthoc_store.write_reconstructed(directory, s, target, ema, info)
        log(f"[posthoc] {stage} sigma_rel {s:g} at step {target}: {len(used)} snapshot EMAs, "
            f"profile error {err:.2e} -> {where}")
        out.append(dict(info, where=where))
    return out


def _define_flags(fv) -> None:
    from absl import flags

    from scm_jax import cli

    cli.define_config_flags(fv, distributed=False)
    flags.DEFINE_string("workdir", None, "the run's workdir", flag_values=fv)
    flags.DEFINE_string("stage", "teacher", "the stage whose snapshots are read", flag_values=fv)
    flags.DEFINE_list("sigma_rel", None, "the sigma_rels to reconstruct, e.g. 0.015,0.05,0.1",
                      flag_values=fv)
    flags.DEFINE_integer("step", 0, "the step to reconstruct at (0: the last snapshot's)",
                         flag_values=fv)
    flags.mark_flags_as_required(["workdir", "sigma_rel"], flag_values=fv)


def _run(fv, overrides) -> None:
    from scm_jax import cli
    from scm_jax.errors import ConfigError

    config = cli.load_config(fv, overrides)
    try:
        sigma_rels = [float(s) for s in fv.sigma_rel]
    except ValueError as err:
        raise ConfigError(f"--sigma_rel={','.join(fv.sigma_rel)} is invalid: expected numbers, "
                          f"e.g. 0.015,0.05,0.1") from err
    for s in sigma_rels:
        if not 0.0 < s < MAX_SIGMA_REL:
            raise ConfigError(f"--sigma_rel {s:g} is invalid: a power EMA's sigma_rel must be in "
                              f"(0, {MAX_SIGMA_REL})")
    reconstruct_stage(config, fv.workdir, fv.stage, sigma_rels, step=fv.step,
                      log=lambda m: print(m, flush=True))


def main(argv=None) -> int:
    """The command; argv as sys.argv (program name first). Returns the exit status."""
    from scm_jax import cli

    return cli.run_command(__doc__, _define_flags, _run, argv)


if __name__ == "__main__":
    sys.exit(main())
