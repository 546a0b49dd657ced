"""Unconditional CIFAR-10 with DDPM++ (sCM App. G.1/G.2), the paper's settings.

    python -m scm_jax.main --config=experiments/cifar10.py:stage=teacher --workdir=DIR \
        --config.data.data_dir=/path/to/tensorflow_datasets
    python -m scm_jax.main --config=experiments/cifar10.py:stage=sct --workdir=DIR   # then scd

Data: `tfds build cifar10 --file_format=array_record --data_dir=...` once (docs/paper-scale.md). Teacher:
Adam 1e-3, batch 512, dropout 0.13, 400k steps; sCT/sCD: RAdam 1e-4 (0.9, 0.99), P(-1.0, 1.4),
EMA half-life 0.5 Mimg, sCT dropout 0.2. `:variant=runlocal` is a tiny version for tests.
"""
from scm_jax.paper_configs import cifar10_config


def get_config(arg: str | None = None):
    return cifar10_config(arg)
