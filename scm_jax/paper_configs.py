"""The paper's training settings as configs: CIFAR-10 (DDPM++), ImageNet 64 and ImageNet 512
(EDM2 U-Net S..XXL, or DiT S..XL for the latents), from sCM App. G and Tables 4/5.

`experiments/{cifar10,imagenet64,imagenet512}.py` are thin wrappers around the builders here, so
the numbers live in one table per dataset; network sizes live in each backbone's `PRESETS`.
Every value is an ordinary config entry: `--config.scd.optimizer.lr=...` overrides it. The
'runlocal' variant keeps the structure with a backbone's tiny 'xs' preset, a small batch and a
few steps (the tests train it on mock data).

Choices where the paper is silent (each a config value):
- attention_impl 'auto': the fused Pallas attention+JVP kernel in the tangent pass on TPU/GPU,
  XLA attention on CPU (the differentiated pass always uses XLA attention);
- compute dtype bfloat16 (the paper trains in FP16 on GPUs; bfloat16 is the TPU-native type and
  needs no loss scaling), float32 parameters, and t / embeddings / tangent / loss in float32;
- the CM learning rate follows the teacher's inverse-sqrt schedule (0.01x alpha_ref) without
  EDM2's 10-Mimg ramp-up (the 10k-step tangent warm-up already ramps the objective);
- the teacher trains one power-function EMA with the sigma_rel the paper picks post hoc for CM
  initialization (Tables 4/5 "teacher EMA sigma_rel"), since the CM starts from that EMA;
- CIFAR-10's CM iteration count is not given: 400k (the ECT comparison's longest run);
- CIFAR-10's teacher follows EDM's DDPM++ recipe (P_mean -1.2, P_std 1.2, 10-Mimg LR ramp-up,
  EMA half-life 0.5 Mimg);
- DiT: the paper trains none, so `DIT` below holds DiT's own teacher recipe and a CM recipe
  derived from the paper's rules (see its comment).
"""
import ml_collections

from scm_jax import configs, objectives, optimizers
from scm_jax.errors import ConfigError
from scm_jax.evaluation import settings as eval_settings
from scm_jax.networks import ddpmpp, dit, edm2

# Table 5 (ImageNet 512) and Table 4 (ImageNet 64), columns per size (widths: edm2.PRESETS).
# teacher lr (alpha_ref), teacher iterations, teacher dropout, teacher EMA sigma_rel for the CM
# init, sCT dropout, sCD dropout (at resolutions <= 16).
IMAGENET512 = dict(
    sizes=("s", "m", "l", "xl", "xxl"),
    paper_params_m=dict(s=280.2, m=497.8, l=777.6, xl=1119.4, xxl=1523.4),
    teacher_lr=dict(s=1.0e-2, m=9.0e-3, l=8.0e-3, xl=7.0e-3, xxl=6.5e-3),
    teacher_steps=dict(s=1_048_000, m=1_048_000, l=696_000, xl=598_000, xxl=376_000),
    teacher_dropout=dict(s=0.0, m=0.1, l=0.1, xl=0.1, xxl=0.1),
    teacher_ema=dict(s=0.025, m=0.03, l=0.015, xl=0.02, xxl=0.015),
    sct_dropout=dict(s=0.25, m=0.35, l=0.35, xl=0.35, xxl=0.35),
    scd_dropout=dict(s=0.0, m=0.1, l=0.1, xl=0.1, xxl=0.1),
    t_ref=70_000, teacher_p=(-0.4, 1.0), cm_p=(-0.8, 1.6), sct_steps=100_000,
    scd_steps=200_000, guidance=(1.0, 2.0), label_dropout=0.1,
)
IMAGENET64 = dict(
    sizes=("s", "m", "l", "xl"),
    paper_params_m=dict(s=280.2, m=497.8, l=777.6, xl=1119.4),
    teacher_lr=dict(s=1.0e-2, m=9.0e-3, l=8.0e-3, xl=7.0e-3),
    teacher_steps=dict(s=1_048_000, m=1_486_000, l=761_000, xl=540_000),
    teacher_dropout=dict(s=0.0, m=0.1, l=0.1, xl=0.1),
    teacher_ema=dict(s=0.075, m=0.06, l=0.04, xl=0.04),
    sct_dropout=dict(s=0.45, m=0.45, l=0.45, xl=0.45),
    scd_dropout=dict(s=0.0, m=0.0, l=0.0, xl=0.0),
    t_ref=35_000, teacher_p=(-0.8, 1.6), cm_p=(-1.0, 1.6), sct_steps=400_000,
    scd_steps=400_000, guidance=(1.0, 1.0), label_dropout=0.0,
)
# DiT on ImageNet 512 latents. The teacher is DiT's own recipe (Peebles & Xie 2023, Sec. 4):
# Adam without weight decay at a constant 1e-4, batch 256, EMA decay 0.9999 per step (a
# half-life of ln 0.5 / ln 0.9999 = 6931 steps = 1.77 Mimg at batch 256), no dropout, label
# dropout 0.1 for CFG, 400k steps (DiT's ablation length; DiT-XL/2's 7M is a flag away), with
# TrigFlow's IN512 proposal P(-0.4, 1.0) (Table 5: a property of the latent data, not of the
# backbone). The CMs follow the paper's rules for a network of ordinary (not magnitude-
# preserving) layers, i.e. CIFAR-10's DDPM++ recipe: the teacher's batch (App. G.2), RAdam
# (0.9, 0.99) at a constant 0.1x the teacher's lr (CIFAR: 1e-4 vs 1e-3); and IN512's CM
# settings otherwise (P(-0.8, 1.6), c = 0.1, H = 10k, power EMA 0.05, 100k / 200k steps,
# s ~ U[1, 2]). No dropout: Table 5's rates apply to U-Net blocks at resolutions <= 16, which
# a DiT (one 32x32 token grid) does not have; `--config.sct.dropout` sets one.
DIT = dict(
    sizes=dit.SIZES, teacher_lr=1e-4, batch=256, teacher_steps=400_000,
    teacher_ema_halflife=1_774_367, cm_lr=1e-5, dropout=0.0,
)
VSD_STEPS = 20_000               # sCD + aVSD iterations (Table 5); aVSD alone: the same
CM_EMA_SIGMA_REL = 0.05          # power EMA 0.05 for the ImageNet CMs (sCM Sec. 5.2, App. G.2)
# EDM2's post-hoc EMA (Karras et al. 2024, Sec. 3): two power EMAs tracked, a snapshot every
# 8 Mi images (4096 steps of 2048), for every stage of the EDM2 presets with `posthoc=true`.
POSTHOC = dict(sigma_rels=(0.05, 0.10), every_images=8 << 20)
EDM2_RAMPUP_IMAGES = 10_000_000  # EDM2's LR ramp-up, for the teachers
# EDM2's guiding network for ImageNet 512 (its `-guid-` presets): the XS U-Net (128 channels),
# unconditional, trained by EDM2's XS recipe (lr 0.012, 2^31 images = 1,048,576 steps of 2048,
# no dropout); its EMA length is the teacher's (EDM2 pairs them so).
GUIDE = dict(channels=128, lr=1.2e-2, steps=1_048_576, dropout=0.0)
PIPELINE = ("teacher", "scd", "sct")   # then stage=eval, once the feature weights are set


def _eval(dataset: str, tiny: bool) -> ml_collections.ConfigDict:
    """The evaluation of a paper dataset: FID and FD-DINOv2 over 50k samples (sCM Sec. 6,
    Tables 2-3, 6). The paper reports 1- and 2-step CMs everywhere and multistep sCD (M = 4, 8,
    16) and guidance per metric on ImageNet 512 (Table 6: FID best at 1.2-1.5, FD-DINOv2 at
    1.8-2.0), so ImageNet 512 sweeps M in 1..16 and scales 1.2, 1.4, 2.0; the teacher is solved
    in 32 steps (63 evaluations, EDM2's), CIFAR-10's in 18 (35, EDM's). Weights and reference
    statistics are paths the user sets (docs/evaluation.md)."""
    if tiny:   # the tests' version: a few samples, random-weight networks they write
        return eval_settings.eval_section(
            num_samples=16, batch_size=8, pr_samples=8, in_loop_samples=16, grid_samples=8,
            teacher_steps=(2,), consistency_steps=(1, 2, 4),
            guidance_scales=(1.0, 1.5) if dataset == "imagenet512" else (1.0,))
    if dataset == "imagenet512":
        return eval_settings.eval_section(teacher_steps=(32,), consistency_steps=(1, 2, 4, 8, 16),
                                          guidance_scales=(1.2, 1.4, 2.0))
    return eval_settings.eval_section(teacher_steps=(18,) if dataset == "cifar10" else (32,),
                                      consistency_steps=(1, 2))


def _base(args, data, model, dataset: str) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.stage = args.stage
    config.seed = 0
    config.dry_run = False
    config.pipeline = PIPELINE
    config.data = data
    config.model = model
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
    config.eval = _eval(dataset, args.variant == "runlocal")
    return config


def _lengths(tiny: bool):
    """(steps(n), logging/checkpoint cadence) of a paper run or its runlocal version."""
    steps = (lambda n: 4) if tiny else (lambda n: n)  # noqa: E731
    every = dict(log_every=2, checkpoint_every=2) if tiny else dict(log_every=100,
                                                                     checkpoint_every=5000)
    return steps, every


def _edm2_model(size: str, num_classes: int, tiny: bool) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="edm2",
        **edm2.preset_config("xs" if tiny else size),
        num_classes=num_classes,
        guidance_input=False,
        attention_impl="auto",
        dropout=0.0,
        dropout_max_resolution=16,              # dropout only at resolutions <= 16 (Tables 4/5)
        modulation="adn",
        remat="none",                           # 'block' | a jax.checkpoint policy name
        scan_blocks=True,                       # runs of equal blocks as one nn.scan
        weight_channels=16 if tiny else 128,
        dtype="float32" if tiny else "bfloat16",
    ))


def _dit_model(size: str, num_classes: int, tiny: bool) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="dit", **dit.PRESETS["xs" if tiny else size], mlp_ratio=4.0,
        num_classes=num_classes, guidance_input=False, attention_impl="auto", qk_norm=False,
        dropout=0.0, modulation="adn", remat="none", scan_blocks=True,
        weight_channels=16 if tiny else 128, dtype="float32" if tiny else "bfloat16"))


def _cm_stages(config, *, cm: dict, steps, sct_steps, scd_steps, sct_dropout, scd_dropout,
               guidance) -> None:
    """config.scd, .sct and .dscd from the CM settings `cm` shared by all three."""
    g_min, g_max = guidance
    config.scd = objectives.section("scm", tangent="teacher", steps=steps(scd_steps),
                                    dropout=scd_dropout,
                                    guidance=dict(scale_min=g_min, scale_max=g_max), **cm)
    config.sct = objectives.section("scm", tangent="data", steps=steps(sct_steps),
                                    dropout=sct_dropout, **cm)
    config.dscd = objectives.section("discrete", steps=steps(scd_steps), **cm)
    # aVSD alone and sCD + aVSD (sCM App. C; Table 5: 20k iterations, F_phi at the CM lr with
    # sCD's dropout, L_Diff(phi) P(-0.8, 1.6), L_aVSD P(0.4, 2.0), lambda 1); both start from
    # the teacher's EMA like every CM.
    vsd = dict(fake_dropout=scd_dropout)
    config.vsd = objectives.section("avsd", steps=steps(VSD_STEPS), scd_weight=0.0,
                                    dropout=scd_dropout, vsd=vsd,
                                    guidance=dict(scale_min=g_min, scale_max=g_max), **cm)
    config.scd_vsd = objectives.section("avsd", steps=steps(VSD_STEPS), scd_weight=1.0,
                                        dropout=scd_dropout, vsd=vsd,
                                        guidance=dict(scale_min=g_min, scale_max=g_max), **cm)
    if g_max != 1.0:
        # The guided student takes the scale as an input (sCM Sec. 7).
        config.model.guidance_input = True


def imagenet_config(dataset: str, arg: str | None) -> ml_collections.ConfigDict:
    """ImageNet 64 (pixels) or 512 (SD-VAE latents) with the EDM2 U-Net (or DiT for latents).

    arg: variant=s|m|l|xl[|xxl]|runlocal, stage=teacher|scd|sct|dscd|all, backbone=edm2|dit,
    teacher=trigflow|edm2, guide=none|xs, posthoc=false|true. teacher=edm2 builds EDM2's own network
    (`model.edm2_native`: EDM's time input, EDM2's modulation, negated) so that a teacher
    imported from EDM2's published pickles (`python -m scm_jax.import_teacher`) is distilled;
    the students share it. guide=xs (ImageNet 512, EDM2 backbone) adds the stage `guide`, EDM2's
    unconditional XS guiding network (`GUIDE`; imported with `--guide_pkl` or trained), and the
    guided students' teacher takes its unconditional branch from it instead of from the
    teacher's null label (EDM2's guidance, Karras et al. 2024, Sec. 5). posthoc=true tracks
    EDM2's post-hoc EMAs in every stage (`POSTHOC`; `python -m scm_jax.posthoc_ema` picks an EMA
    length after training); off by default, since the two extra parameter copies are not in the
    fit-and-speed tables of docs/paper-scale.md.
    """
    args = configs.parse_arg(arg, {"variant": "s", "backbone": "edm2", "stage": "all",
                                   "teacher": "trigflow", "guide": "none", "posthoc": False})
    if args.guide not in ("none", "xs") or (args.guide == "xs" and (
            args.backbone != "edm2" or dataset != "imagenet512")):
        raise ConfigError(f"unknown guide {args.guide!r} for {dataset} with backbone "
                          f"{args.backbone!r}; expected 'none'" + (
                              " or 'xs'" if (args.backbone, dataset) == ("edm2", "imagenet512")
                              else ""))
    if args.teacher not in ("trigflow", "edm2") or (args.teacher == "edm2"
                                                    and args.backbone != "edm2"):
        raise ConfigError(f"unknown teacher {args.teacher!r} for backbone {args.backbone!r}; "
                          f"expected 'trigflow'" + (" or 'edm2'" if args.backbone == "edm2"
                                                    else ""))
    if args.backbone not in ("edm2", "dit") or (args.backbone == "dit" and dataset != "imagenet512"):
        raise ConfigError(
            f"unknown backbone {args.backbone!r} for {dataset}; expected 'edm2'"
            + (" or 'dit'" if dataset == "imagenet512" else ""))
    if args.backbone == "dit":
        return _dit_imagenet512(args)
    table = IMAGENET512 if dataset == "imagenet512" else IMAGENET64
    tiny = args.variant == "runlocal"
    if not tiny and args.variant not in table["sizes"]:
        raise ConfigError(f"unknown variant {args.variant!r}; expected one of "
                                  f"{table['sizes'] + ('runlocal',)}")
    size = "s" if tiny else args.variant
    if dataset == "imagenet512":
        from scm_jax.data.latents import latent_data_config

        data = latent_data_config(path="", resolution=64 if tiny else 512)
    else:
        from scm_jax.data.images import image_data_config

        data = image_data_config("imagenet64", resolution=16 if tiny else 64)
    config = _base(args, data, _edm2_model(size, 1000, tiny), dataset)
    config.paper_params_m = 0.0 if tiny else table["paper_params_m"][size]
    if args.teacher == "edm2":   # EDM2's published network: its modulation, time input, sign
        config.model.modulation = "edm2"
        config.model.edm2_native = True

    batch = 16 if tiny else 2048
    steps, every = _lengths(tiny)
    adam = dict(b1=0.9, b2=0.99, eps=1e-11, schedule="inv_sqrt", t_ref=table["t_ref"])
    teacher_lr = table["teacher_lr"][size]
    config.teacher = objectives.section(
        "diffusion", steps=steps(table["teacher_steps"][size]), batch_size=batch,
        dropout=table["teacher_dropout"][size], label_dropout=table["label_dropout"],
        loss=dict(p_mean=table["teacher_p"][0], p_std=table["teacher_p"][1]),
        optimizer=optimizers.default_config(
            lr=teacher_lr, warmup_steps=0 if tiny else EDM2_RAMPUP_IMAGES // batch, **adam),
        ema=dict(kind="power", value=table["teacher_ema"][size]), **every)
    cm = dict(batch_size=batch,
              loss=dict(p_mean=table["cm_p"][0], p_std=table["cm_p"][1], tangent_c=0.1,
                        warmup_steps=2 if tiny else 10_000),
              optimizer=optimizers.default_config(lr=0.01 * teacher_lr, **adam),
              ema=dict(kind="power", value=CM_EMA_SIGMA_REL), **every)
    _cm_stages(config, cm=cm, steps=steps, sct_steps=table["sct_steps"],
               scd_steps=table["scd_steps"], sct_dropout=table["sct_dropout"][size],
               scd_dropout=table["scd_dropout"][size], guidance=table["guidance"])
    if args.guide == "xs":
        _add_guide(config, tiny=tiny, steps=steps, every=every, batch=batch, adam=adam,
                   p=table["teacher_p"], ema=table["teacher_ema"][size])
    if args.posthoc:
        for name in configs.training_stages(config):
            config[name].ema.posthoc_sigma_rels = POSTHOC["sigma_rels"]
            config[name].ema.posthoc_every = 2 if tiny else POSTHOC["every_images"] // batch
    return config


def _add_guide(config, *, tiny: bool, steps, every: dict, batch: int, adam: dict, p, ema):
    """The `guide` stage (EDM2's unconditional XS network, `GUIDE`; runlocal: 8 channels) and
    the guided students' `guidance.network` naming it; the pipeline trains it after the teacher
    (a finished, imported guide resumes as done)."""
    config.guide = objectives.section(
        "diffusion", steps=steps(GUIDE["steps"]), batch_size=batch, dropout=GUIDE["dropout"],
        model=dict(channels=8 if tiny else GUIDE["channels"], num_classes=0),
        loss=dict(p_mean=p[0], p_std=p[1]),
        optimizer=optimizers.default_config(
            lr=GUIDE["lr"], warmup_steps=0 if tiny else EDM2_RAMPUP_IMAGES // batch, **adam),
        ema=dict(kind="power", value=ema), **every)
    for name in ("scd", "vsd", "scd_vsd"):
        config[name].guidance.network = "guide"
    config.pipeline = ("teacher", "guide") + tuple(config.pipeline[1:])


def _dit_imagenet512(args) -> ml_collections.ConfigDict:
    """ImageNet 512 latents with DiT-S/B/L/XL (patch 2), by the `DIT` recipe."""
    from scm_jax.data.latents import latent_data_config

    tiny = args.variant == "runlocal"
    if not tiny and args.variant not in DIT["sizes"]:
        raise ConfigError(f"unknown variant {args.variant!r} for backbone=dit; "
                                  f"expected one of {DIT['sizes'] + ('runlocal',)}")
    data = latent_data_config(path="", resolution=64 if tiny else 512)
    config = _base(args, data, _dit_model(args.variant, 1000, tiny), "imagenet512")
    config.paper_params_m = 0.0
    batch = 16 if tiny else DIT["batch"]
    steps, every = _lengths(tiny)
    t512 = IMAGENET512
    config.teacher = objectives.section(
        "diffusion", steps=steps(DIT["teacher_steps"]), batch_size=batch,
        dropout=DIT["dropout"], label_dropout=t512["label_dropout"],
        loss=dict(p_mean=t512["teacher_p"][0], p_std=t512["teacher_p"][1]),
        optimizer=optimizers.default_config(lr=DIT["teacher_lr"], b1=0.9, b2=0.999, eps=1e-8),
        ema=dict(kind="halflife", value=DIT["teacher_ema_halflife"]), **every)
    cm = dict(batch_size=batch,
              loss=dict(p_mean=t512["cm_p"][0], p_std=t512["cm_p"][1], tangent_c=0.1,
                        warmup_steps=2 if tiny else 10_000),
              optimizer=optimizers.default_config(name="radam", lr=DIT["cm_lr"], b1=0.9,
                                                  b2=0.99, eps=1e-8),
              ema=dict(kind="power", value=CM_EMA_SIGMA_REL), **every)
    _cm_stages(config, cm=cm, steps=steps, sct_steps=t512["sct_steps"],
               scd_steps=t512["scd_steps"], sct_dropout=DIT["dropout"],
               scd_dropout=DIT["dropout"], guidance=t512["guidance"])
    return config


def cifar10_config(arg: str | None) -> ml_collections.ConfigDict:
    """Unconditional CIFAR-10 with DDPM++ (sCM App. G.1/G.2). arg: variant=paper|runlocal, stage."""
    from scm_jax.data.images import image_data_config

    args = configs.parse_arg(arg, {"variant": "paper", "stage": "all"})
    if args.variant not in ("paper", "runlocal"):
        raise ConfigError(f"unknown variant {args.variant!r}; expected 'paper' or "
                                  f"'runlocal'")
    tiny = args.variant == "runlocal"
    preset = dict(ddpmpp.PRESETS["xs" if tiny else "cifar10"])
    preset.pop("dropout", None)   # a stage setting: the teacher's below, the CMs' their own
    model = ml_collections.ConfigDict(dict(
        name="ddpmpp", **preset, num_classes=0, guidance_input=False, attention_impl="auto",
        dropout=0.0, dropout_max_resolution=0, modulation="adn", remat="none",
        scan_blocks=True, weight_channels=16 if tiny else 128, dtype="float32"))
    data = image_data_config("cifar10", resolution=16 if tiny else 32)
    config = _base(args, data, model, "cifar10")
    config.paper_params_m = 0.0   # the paper gives no count; EDM's DDPM++ is 55.7M (see docs/paper-scale.md)

    batch = 16 if tiny else 512
    steps, every = _lengths(tiny)
    halflife = dict(kind="halflife", value=500_000)   # EMA half-life 0.5 Mimg
    config.teacher = objectives.section(
        "diffusion", steps=steps(400_000), batch_size=batch,
        dropout=ddpmpp.PRESETS["cifar10"]["dropout"], loss=dict(p_mean=-1.2, p_std=1.2),
        optimizer=optimizers.default_config(
            lr=1e-3, b1=0.9, b2=0.999, eps=1e-8,
            warmup_steps=0 if tiny else EDM2_RAMPUP_IMAGES // batch),
        ema=halflife, **every)
    cm = dict(batch_size=batch,
              loss=dict(p_mean=-1.0, p_std=1.4, tangent_c=0.1, warmup_steps=2 if tiny else 10_000),
              optimizer=optimizers.default_config(name="radam", lr=1e-4, b1=0.9, b2=0.99,
                                                  eps=1e-8),
              ema=halflife, **every)
    _cm_stages(config, cm=cm, steps=steps, sct_steps=400_000, scd_steps=400_000,
               sct_dropout=0.2, scd_dropout=0.0, guidance=(1.0, 1.0))
    return config
