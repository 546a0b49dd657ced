"""Class-conditional ImageNet 512x512 in SD-VAE latent space with the EDM2 U-Net (sCM Table 5).

    python -m scm_jax.main --config=experiments/imagenet512.py:variant=xxl,stage=scd \
        --workdir=gs://BUCKET/in512_xxl --config.data.path=gs://BUCKET/in512_latents

Latents come from `python -m scm_jax.encode_latents` (docs/paper-scale.md: preparing ImageNet 512).
Variants s, m, l, xl, xxl (model channels 192..448); `runlocal` is a tiny version for tests;
`backbone=dit` swaps in DiT-S/B/L/XL with patch 2 (variant=s|b|l|xl). Batch 2048; Adam (0.9,
0.99, 1e-11), inverse-sqrt decay t_ref 70k; teacher P(-0.4, 1.0) with label dropout 0.1; CMs
P(-0.8, 1.6), lr 0.01 x teacher; sCD distills the CFG teacher with s ~ U[1, 2] given to the
student as an input; sCT 100k and sCD 200k steps. `--config.dry_run=True` prints the resolved
config and the parameter count and exits.
"""
from scm_jax.paper_configs import imagenet_config


def get_config(arg: str | None = None):
    return imagenet_config("imagenet512", arg)
