"""Class-conditional ImageNet 64x64 in pixel space with the EDM2 U-Net (sCM Table 4).

    python -m scm_jax.main --config=experiments/imagenet64.py:variant=m,stage=teacher \
        --workdir=gs://BUCKET/in64_m --config.data.data_dir=gs://BUCKET/tensorflow_datasets
    python -m scm_jax.main --config=experiments/imagenet64.py:variant=m,stage=scd --workdir=...

Variants s, m, l, xl (model channels 192/256/320/384); `runlocal` is a tiny version for tests.
Run on every worker of a TPU pod with `launch/` (add --distributed). Batch 2048; Adam (0.9, 0.99,
1e-11) with EDM2's inverse-sqrt decay (t_ref 35k); CM lr = 0.01 x teacher; P_mean/P_std
-0.8/1.6 (teacher), -1.0/1.6 (CM); sCT dropout 45% at resolutions <= 16; 400k CM steps.
"""
from scm_jax.paper_configs import imagenet_config


def get_config(arg: str | None = None):
    return imagenet_config("imagenet64", arg)
