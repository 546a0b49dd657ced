"""The embedded default: the whole sCM pipeline on scikit-learn's 8x8 digits, on a CPU.

    python -m scm_jax.main --config=experiments/digits.py --workdir=/tmp/digits

runs, in order: the TrigFlow diffusion teacher, sCD and sCT (both initialized from the teacher's
EMA, sCM App. G.2), the discrete-time dsCD baseline (App. E), aVSD alone and sCD + aVSD
(App. C), then the evaluation table. Any stage runs alone with
`:stage=teacher|scd|sct|dscd|vsd|scd_vsd|eval`; `:variant=tiny` is a seconds-long
smoke version (used by the tests). Overrides: `--config.scd.steps=500` etc. `:teacher=edm2`
swaps the U-Net for EDM2's own network at a small width (`model.edm2_native`: EDM's time input,
EDM2's modulation, the output negated), the network a teacher imported from EDM2's pickles has
(`benchmarks/edm2_digits.py` trains one, writes it as an EDM2 pickle, imports and distills it).

Choices for this dataset (the paper has none): sigma_d = 0.75 is the measured std of the pixels
scaled to [-1, 1] (TrigFlow wants noise of the data's std); the teacher's proposal follows the
paper's IN64 teacher (P_mean -0.8, P_std 1.6) and the CMs' the paper's CM setting (-1.0, 1.6);
the CM learning rate is 0.1x the teacher's (the paper's 0.01x assumes 400k-iteration runs;
`:teacher=edm2` trains at EDM2's learning-rate scale, 2e-2, see below);
the tangent warm-up H is shortened in proportion to the run length; EDM2's force_finite is off
(no non-finite gradient was seen here, and on a CPU it adds seconds of compile time).
"""
import ml_collections

from scm_jax import configs, objectives, optimizers
from scm_jax.evaluation import settings as eval_settings
from scm_jax.errors import ConfigError


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = configs.parse_arg(arg, {"variant": "default", "stage": "all", "teacher": "trigflow"})
    if args.variant not in ("default", "tiny"):
        raise ConfigError(f"unknown variant {args.variant!r}; expected 'default' or "
                          f"'tiny'")
    if args.teacher not in ("trigflow", "edm2"):
        raise ConfigError(f"unknown teacher {args.teacher!r}; expected 'trigflow' or 'edm2'")
    tiny = args.variant == "tiny"

    config = ml_collections.ConfigDict()
    config.stage = args.stage
    config.seed = 0
    config.dry_run = False
    config.pipeline = ("teacher", "scd", "sct", "dscd", "vsd", "scd_vsd", "eval")
    # After the teacher, two of the consistency stages train side by side (scm_jax/pipeline.py):
    # one digits step keeps ~1.3 of a 2-core CPU's cores busy and a compile one.
    config.pipeline_workers = 2
    config.data = ml_collections.ConfigDict(dict(name="digits", holdout=297, sigma_d=0.75))
    config.model = ml_collections.ConfigDict(dict(
        name="unet",
        channels=8 if tiny else 32,
        channel_mult=(1,) if tiny else (1, 2),
        num_blocks=1,
        attn_resolutions=() if tiny else (4,),
        num_heads=1,
        dropout=0.0,
        noise_channels=16 if tiny else 64,
        emb_channels=16 if tiny else 128,
        weight_channels=16 if tiny else 128,
        num_classes=10,
        guidance_input=False,
        attention_impl="xla",
        remat="none",
        dtype="float32",
        # The paper's stabilizers (sCM Sec. 4); the ablation study switches each off.
        time_transform="identity",    # c_noise(t) = t | 'edm': ln(sigma_d tan t) / 4
        time_embedding="positional",  # | 'fourier' (scale 16)
        modulation="adn",             # adaptive double normalization | 'adagn'
    ))
    if args.teacher == "edm2":
        # EDM2's U-Net (magnitude-preserving, Karras et al. 2024) at the U-Net's widths: two
        # levels (8x8, 4x4), one block each, attention at 4x4 (two heads of 32; EDM2 always
        # attends in the lowest level's first decoder block).
        config.model = ml_collections.ConfigDict(dict(
            name="edm2", channels=8 if tiny else 32, channel_mult=(1,) if tiny else (1, 2),
            num_blocks=1, attn_resolutions=() if tiny else (4,),
            channels_per_head=8 if tiny else 32,
            noise_channels=16 if tiny else 64, emb_channels=16 if tiny else 128,
            weight_channels=16 if tiny else 128, num_classes=10, guidance_input=False,
            attention_impl="xla", dropout=0.0, dropout_max_resolution=0, modulation="edm2",
            edm2_native=True, remat="none", scan_blocks=False, dtype="float32"))
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))

    steps = lambda n: 4 if tiny else n  # noqa: E731
    batch = 16 if tiny else 64
    every = dict(log_every=2 if tiny else 100, checkpoint_every=2 if tiny else 500)
    # EMA sigma_rel 0.1, and EDM2's two power EMAs (0.05, 0.10) tracked for post-hoc EMA with a
    # snapshot every 100 steps (`python -m scm_jax.posthoc_ema`).
    ema = dict(kind="power", value=0.1, posthoc_sigma_rels=(0.05, 0.1),
               posthoc_every=2 if tiny else 100)
    # EDM2's magnitude-preserving layers keep every weight at unit RMS (forced weight
    # normalization), so Adam's step is relative to ~1 there and to ~1/sqrt(fan_in) in the
    # U-Net: EDM2 trains them at lr 0.012-0.0065 (XS..XXL). On digits the EDM2 teacher's 35-NFE
    # FD after 2000 steps was 2.22 / 1.37 / 1.13 / 1.25 at lr 5e-3 / 1e-2 / 2e-2 / 4e-2
    # (docs/results.md); 6.4 at the U-Net's 2e-3 (an earlier commit).
    teacher_lr = 2e-2 if args.teacher == "edm2" else 2e-3
    config.teacher = objectives.section(
        "diffusion", steps=steps(2000), batch_size=batch, dropout=0.1, label_dropout=0.1,
        loss=dict(p_mean=-0.8, p_std=1.6),
        optimizer=optimizers.default_config(lr=teacher_lr, b2=0.99, schedule="inv_sqrt",
                                            t_ref=1000, warmup_steps=100, force_finite=False),
        ema=ema, **every)
    cm = dict(batch_size=batch, loss=dict(p_mean=-1.0, p_std=1.6, warmup_steps=2 if tiny else 200),
              optimizer=optimizers.default_config(lr=0.1 * teacher_lr, b2=0.99,
                                                  force_finite=False),
              ema=ema, **every)
    config.scd = objectives.section("scm", tangent="teacher", steps=steps(2500), **cm)
    # sCT 1600 steps: from the default teacher its 2-step FD went 2.29 / 6.27 / 3.37 / 1.80
    # after 200 / 400 / 800 / 1600 steps (scm_jax.studies.compute): worse once the tangent
    # warm-up ends, recovering only past ~1000 steps; 600 steps gave 5.82 (4.1x the teacher).
    config.sct = objectives.section("scm", tangent="data", steps=steps(1600), dropout=0.1, **cm)
    config.dscd = objectives.section("discrete", steps=steps(400),
                                     **dict(cm, loss=dict(cm["loss"], num_points=256)))
    # aVSD alone and sCD + aVSD (sCM App. C), from the teacher like the other CMs, at the best
    # settings of the aVSD sweep (scm_jax.studies.avsd_sweep, docs/results.md): aVSD alone with
    # F_phi at the teacher's lr (10x the CM's; at Table 5's 1x it collapsed, recall ~0.01),
    # 1-step FD 2.71 / 1.98 / 1.78 after 600 / 1200 / 2500 steps against sCD's 2.13 +- 0.04 at
    # 2500 (1200 steps: 2.05 +- 0.09 over 3 seeds, level with sCD at under half its steps;
    # 2500 would lengthen the pipeline by ~7 minutes). sCD + aVSD at lambda 0.1 with F_phi at
    # 3x the CM's lr: 1-step FD 3.24 at 600 steps against 7.69 at Table 5's lambda 1 and 4.02
    # for sCD alone at 600 steps.
    config.vsd = objectives.section("avsd", scd_weight=0.0, steps=steps(1200),
                                    vsd=dict(fake_lr=teacher_lr), **cm)
    config.scd_vsd = objectives.section("avsd", scd_weight=1.0, steps=steps(600),
                                        vsd=dict(weight=0.1, fake_lr=0.3 * teacher_lr), **cm)

    # The digits classifier's scores (scm_jax.evaluation.evaluators.DigitsScorer), not FID.
    config.eval = eval_settings.eval_section(
        num_samples=64 if tiny else 1500,
        batch_size=64 if tiny else 500,
        consistency_steps=(1, 2),
        teacher_steps=(2, 3) if tiny else (18, 8, 4, 2),   # NFE = 2 * steps - 1: 35, 15, 7, 3
        teacher_solver="dpm2s",
        features=(), pr_samples=0, grid_samples=100, in_loop_samples=64 if tiny else 500,
        classifier_steps=50 if tiny else 0,   # 0 = the classifier's default training length
        seed=1,
    )
    return config
