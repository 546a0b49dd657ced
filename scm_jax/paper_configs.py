"""The paper's training settings as configs: CIFAR-10 (DDPM++), ImageNet 64 and ImageNet 512
(EDM2 U-Net S..XXL), from sCM App. G and Tables 4/5 (digest §7).

`experiments/{cifar10,imagenet64,imagenet512}.py` are thin wrappers around the builders here, so
the numbers live in one table per dataset. Every value is an ordinary config entry:
`--config.scd.optimizer.lr=...` overrides it. The 'runlocal' variant keeps the structure with a
tiny network, batch and step count (the tests train it on mock data).

Choices where the paper is silent (each a config value):
- attention_impl 'auto': the fused Pallas attention+JVP kernel in the tangent pass on TPU/GPU,
  XLA attention on CPU (the differentiated pass always uses XLA attention);
- compute dtype bfloat16 (the paper trains in FP16 on GPUs; bfloat16 is the TPU-native type and
  needs no loss scaling), float32 parameters, and t / embeddings / tangent / loss in float32;
- the CM learning rate follows the teacher's inverse-sqrt schedule (0.01x alpha_ref) without
  EDM2's 10-Mimg ramp-up (digest §9.14: the 10k-step tangent warm-up already ramps the objective);
- the teacher trains one power-function EMA with the sigma_rel the paper picks post hoc for CM
  initialization (Tables 4/5 "teacher EMA sigma_rel"), since the CM starts from that EMA;
- CIFAR-10's CM iteration count is not given: 400k (the ECT comparison's longest run);
- CIFAR-10's teacher follows EDM's DDPM++ recipe (P_mean -1.2, P_std 1.2, 10-Mimg LR ramp-up,
  EMA half-life 0.5 Mimg).
"""
import ml_collections

from scm_jax import configs

# Table 5 (ImageNet 512) and Table 4 (ImageNet 64), columns per size.
# teacher lr (alpha_ref), teacher iterations, teacher dropout, teacher EMA sigma_rel for the CM
# init, sCT dropout, sCD dropout (at resolutions <= 16).
IMAGENET512 = dict(
    channels=dict(s=192, m=256, l=320, xl=384, xxl=448),
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
    channels=dict(s=192, m=256, l=320, xl=384),
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
CM_EMA_SIGMA_REL = 0.05          # digest §9.1: power EMA 0.05 for the ImageNet CMs
EDM2_RAMPUP_IMAGES = 10_000_000  # EDM2's LR ramp-up, for the teachers
DIT_SIZES = ("s", "b", "l", "xl")


def _common(config_arg, defaults):
    return configs.parse_arg(config_arg, dict(defaults, stage="all"))


def _base(stage: str, data, model, mesh_fsdp: int = 1) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.stage = stage
    config.seed = 0
    config.dry_run = False
    # The paper's datasets have no embedded evaluation yet; 'all' runs the training stages.
    config.pipeline = ("teacher", "scd", "sct")
    config.data = data
    config.model = model
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=mesh_fsdp))
    return config


def _edm2_model(channels: int, num_classes: int, tiny: bool) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="edm2",
        channels=16 if tiny else channels,
        channel_mult=(1, 2) if tiny else (1, 2, 3, 4),
        num_blocks=1 if tiny else 3,
        attn_resolutions=(8,) if tiny else (16, 8),
        channels_per_head=8 if tiny else 64,
        noise_channels=16 if tiny else 0,       # 0: model_channels * channel_mult[0]
        emb_channels=32 if tiny else 0,         # 0: model_channels * max(channel_mult)
        num_classes=num_classes,
        guidance_input=False,
        attention_impl="auto",
        dropout=0.0,
        dropout_max_resolution=16,              # dropout only at resolutions <= 16 (Tables 4/5)
        modulation="adn",
        weight_channels=16 if tiny else 128,
        dtype="float32" if tiny else "bfloat16",
    ))


def _dit_model(size: str, num_classes: int, tiny: bool) -> ml_collections.ConfigDict:
    from scm_jax.networks.dit import PRESETS

    preset = PRESETS["xs" if tiny else size]
    return ml_collections.ConfigDict(dict(
        name="dit", **preset, mlp_ratio=4.0, num_classes=num_classes, guidance_input=False,
        attention_impl="auto", qk_norm=False, dropout=0.0, modulation="adn",
        weight_channels=16 if tiny else 128, dtype="float32" if tiny else "bfloat16"))


def imagenet_config(dataset: str, arg: str | None) -> ml_collections.ConfigDict:
    """ImageNet 64 (pixels) or 512 (SD-VAE latents) with the EDM2 U-Net (or DiT for latents).

    arg: variant=s|m|l|xl[|xxl]|runlocal, stage=teacher|scd|sct|dscd|all, backbone=edm2|dit.
    """
    table = IMAGENET512 if dataset == "imagenet512" else IMAGENET64
    args = _common(arg, {"variant": "s", "backbone": "edm2"})
    tiny = args.variant == "runlocal"
    sizes = DIT_SIZES if args.backbone == "dit" else tuple(table["channels"])
    if args.backbone not in ("edm2", "dit") or (args.backbone == "dit" and dataset != "imagenet512"):
        raise ValueError(f"unknown backbone {args.backbone!r} for {dataset}; expected 'edm2'"
                         + (" or 'dit'" if dataset == "imagenet512" else ""))
    if not tiny and args.variant not in sizes:
        raise ValueError(f"unknown variant {args.variant!r}; expected one of "
                         f"{sizes + ('runlocal',)}")
    size = "s" if tiny or args.backbone == "dit" else args.variant
    num_classes = 1000
    if dataset == "imagenet512":
        from scm_jax.data.latents import latent_data_config

        data = latent_data_config(path="", resolution=64 if tiny else 512)
    else:
        from scm_jax.data.images import image_data_config

        data = image_data_config("imagenet64", resolution=16 if tiny else 64)
    model = (_dit_model(args.variant if not tiny else "s", num_classes, tiny)
             if args.backbone == "dit" else _edm2_model(table["channels"][size], num_classes, tiny))
    config = _base(args.stage, data, model)
    config.paper_params_m = 0.0 if tiny or args.backbone == "dit" else table["paper_params_m"][size]

    batch = 16 if tiny else 2048
    steps = (lambda n: 4) if tiny else (lambda n: n)  # noqa: E731
    every = dict(log_every=2, checkpoint_every=2) if tiny else dict(log_every=100,
                                                                     checkpoint_every=5000)
    adam = dict(b1=0.9, b2=0.99, eps=1e-11, schedule="inv_sqrt", t_ref=table["t_ref"])
    teacher_lr = table["teacher_lr"][size]
    config.teacher = configs.stage_config(
        "diffusion", steps=steps(table["teacher_steps"][size]), batch_size=batch,
        dropout=table["teacher_dropout"][size], label_dropout=table["label_dropout"],
        loss=dict(p_mean=table["teacher_p"][0], p_std=table["teacher_p"][1]),
        optimizer=configs.optimizer_config(
            lr=teacher_lr, warmup_steps=0 if tiny else EDM2_RAMPUP_IMAGES // batch, **adam),
        ema=dict(kind="power", value=table["teacher_ema"][size]), **every)
    cm = dict(batch_size=batch,
              loss=dict(p_mean=table["cm_p"][0], p_std=table["cm_p"][1], tangent_c=0.1,
                        warmup_steps=2 if tiny else 10_000),
              optimizer=configs.optimizer_config(lr=0.01 * teacher_lr, **adam),
              ema=dict(kind="power", value=CM_EMA_SIGMA_REL), **every)
    g_min, g_max = table["guidance"]
    config.scd = configs.stage_config(
        "scm", tangent="teacher", steps=steps(table["scd_steps"]),
        dropout=table["scd_dropout"][size], guidance=dict(scale_min=g_min, scale_max=g_max), **cm)
    config.sct = configs.stage_config("scm", tangent="data", steps=steps(table["sct_steps"]),
                                      dropout=table["sct_dropout"][size], **cm)
    config.dscd = configs.stage_config("discrete", steps=steps(table["scd_steps"]), **cm)
    if g_max != 1.0:
        # The guided student takes the scale as an input (sCM Sec. 6, digest §9.16).
        config.model.guidance_input = True
    return config


def cifar10_config(arg: str | None) -> ml_collections.ConfigDict:
    """Unconditional CIFAR-10 with DDPM++ (sCM App. G.1/G.2). arg: variant=paper|runlocal, stage."""
    from scm_jax.data.images import image_data_config
    from scm_jax.networks.ddpmpp import PRESETS

    args = _common(arg, {"variant": "paper"})
    if args.variant not in ("paper", "runlocal"):
        raise ValueError(f"unknown variant {args.variant!r}; expected 'paper' or 'runlocal'")
    tiny = args.variant == "runlocal"
    preset = dict(PRESETS["xs" if tiny else "cifar10"])
    preset.pop("dropout", None)
    model = ml_collections.ConfigDict(dict(
        name="ddpmpp", **preset, num_classes=0, guidance_input=False, attention_impl="auto",
        dropout=0.0, dropout_max_resolution=0, modulation="adn",
        weight_channels=16 if tiny else 128, dtype="float32"))
    data = image_data_config("cifar10", resolution=16 if tiny else 32)
    config = _base(args.stage, data, model)
    config.paper_params_m = 0.0   # the paper gives no count; EDM's DDPM++ is 55.7M (see README)

    batch = 16 if tiny else 512
    steps = (lambda n: 4) if tiny else (lambda n: n)  # noqa: E731
    every = dict(log_every=2, checkpoint_every=2) if tiny else dict(log_every=100,
                                                                     checkpoint_every=5000)
    halflife = dict(kind="halflife", value=500_000)   # EMA half-life 0.5 Mimg
    config.teacher = configs.stage_config(
        "diffusion", steps=steps(400_000), batch_size=batch, dropout=0.13,
        loss=dict(p_mean=-1.2, p_std=1.2),
        optimizer=configs.optimizer_config(
            lr=1e-3, b1=0.9, b2=0.999, eps=1e-8,
            warmup_steps=0 if tiny else EDM2_RAMPUP_IMAGES // batch),
        ema=halflife, **every)
    cm = dict(batch_size=batch,
              loss=dict(p_mean=-1.0, p_std=1.4, tangent_c=0.1, warmup_steps=2 if tiny else 10_000),
              optimizer=configs.optimizer_config(name="radam", lr=1e-4, b1=0.9, b2=0.99, eps=1e-8),
              ema=halflife, **every)
    config.scd = configs.stage_config("scm", tangent="teacher", steps=steps(400_000), **cm)
    config.sct = configs.stage_config("scm", tangent="data", steps=steps(400_000), dropout=0.2,
                                      **cm)
    config.dscd = configs.stage_config("discrete", steps=steps(400_000), **cm)
    return config
