"""The `eval` section of an experiment config: its schema, defaults and checks (one home).

    config.eval = settings.eval_section(num_samples=1500, features=())   # digits: its classifier

What the evaluation samples per trained model (`scm_jax/evaluate.py`):
- a consistency model at every M in `consistency_steps` (sCM Table 6: 1, 2 and "multistep"
  M = 4, 8, 16; `sampling.multistep_times`);
- a diffusion model with its ODE solver at every N in `teacher_steps` (2N - 1 evaluations);
- each at every scale of `guidance_scales` when the model is guided (a student trained over a
  range of scales, or a teacher trained with label dropout: classifier-free guidance), else at 1.

What it measures: FID and FD-DINOv2 over `num_samples` samples (`features`, weights from
`inception_weights` / `dinov2_weights`, against `reference`), precision / recall on the first
`pr_samples`; the digits experiment (`features=()`) uses its own classifier instead.
"""
import math

import ml_collections

from scm_jax.errors import check

DEFAULTS = dict(
    num_samples=50_000,           # per (model, sampler, guidance scale), as the paper's metrics
    batch_size=500,               # samples per sampling call, over all devices
    seed=1,                       # the sampling seed (each row folds in its own id)
    consistency_steps=(1, 2, 4, 8, 16),   # the CMs' step counts scored (1- and 2-step: paper)
    t_mid=1.1,                    # the 2-step intermediate time (sCM Tables 6, 8)
    teacher_steps=(32, 16, 8),    # solver steps: 63, 31, 15 evaluations
    teacher_solver="dpm2s",       # 'dpm2s' (sCM App. G.1) | 'heun'
    guidance_scales=(1.0,),       # swept for guided models
    features=("inception", "dinov2"),   # the feature networks: FID, FD-DINOv2
    inception_weights="",         # pt_inception-2015-12-05-6726825d.pth, or its converted .npz
    dinov2_weights="",            # dinov2_vitl14_pretrain.pth / .safetensors, or its .npz
    feature_dtype="float32",      # the feature networks' compute dtype: 'float32' | 'bfloat16'
    reference="",                 # ref_stats .npz, EDM's cifar10-32x32.npz / imagenet-64x64.npz, EDM2's img512.pkl
    pr_samples=10_000,            # precision / recall (k = 3) on the first samples (0: off)
    save_samples=False,           # every sample as uint8 .npz chunks under <workdir>/samples/
    grid_samples=64,              # a PNG grid of the first samples of every row (0: none)
    in_loop_samples=5_000,        # samples of the in-training evaluation (<stage>.eval_every)
    sigma_rel=0.0,                # score each stage's post-hoc EMA of this sigma_rel (0: its own EMA)
    classifier_steps=0,           # digits: the classifier's training length (0 = its default)
    # The SD-VAE that decodes latent samples (ImageNet 512) before the feature networks.
    vae=dict(
        weights="",               # sd-vae-ft-mse diffusion_pytorch_model.safetensors
        block_out_channels=(128, 256, 512, 512),   # the SD-VAE's architecture (sd-vae-ft-mse)
        layers_per_block=2,       # the SD-VAE's architecture
        norm_num_groups=32,       # the SD-VAE's architecture
    ),
)


def eval_section(**overrides) -> ml_collections.ConfigDict:
    """An `eval` section: DEFAULTS with `overrides` (nested dicts merge)."""
    cfg = ml_collections.ConfigDict(DEFAULTS)
    for key, value in overrides.items():
        if key not in cfg:
            raise ValueError(f"unknown eval setting {key!r}; expected one of {sorted(cfg)}")
        if isinstance(value, dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    return cfg


def validate(ev) -> None:
    """Every check of config.eval (ConfigError naming the key); files are checked on use."""
    from scm_jax import sampling
    from scm_jax.evaluation import features

    check(ev.num_samples > 3, "eval.num_samples", ev.num_samples, "> 3 (k-NN with k = 3)")
    check(ev.batch_size > 0, "eval.batch_size", ev.batch_size, "> 0")
    check(len(ev.consistency_steps) > 0 and all(int(m) >= 1 for m in ev.consistency_steps),
          "eval.consistency_steps", tuple(ev.consistency_steps), "step counts >= 1")
    check(len(ev.teacher_steps) > 0 and all(int(s) >= 1 for s in ev.teacher_steps),
          "eval.teacher_steps", tuple(ev.teacher_steps), "solver step counts >= 1")
    check(ev.teacher_solver in sampling.SOLVERS, "eval.teacher_solver", ev.teacher_solver,
          f"one of {sampling.SOLVERS}")
    check(0.0 < ev.t_mid < math.pi / 2, "eval.t_mid", ev.t_mid, "in (0, pi/2)")
    check(len(ev.guidance_scales) > 0 and all(float(s) >= 0 for s in ev.guidance_scales),
          "eval.guidance_scales", tuple(ev.guidance_scales), "scales >= 0")
    check(ev.pr_samples >= 0, "eval.pr_samples", ev.pr_samples, ">= 0")
    check(ev.grid_samples >= 0, "eval.grid_samples", ev.grid_samples, ">= 0")
    check(ev.in_loop_samples > 3, "eval.in_loop_samples", ev.in_loop_samples, "> 3")
    check(0.0 <= ev.sigma_rel < 0.28, "eval.sigma_rel", ev.sigma_rel,
          "0 (each stage's own EMA) or a post-hoc EMA's sigma_rel in (0, 0.28)")
    features.validate(ev)
