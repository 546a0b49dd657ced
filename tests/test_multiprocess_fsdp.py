"""Two processes (4 CPU devices each) train ImageNet 512's runlocal EDM2 on encoded latents
with the weights split over both processes' devices (fsdp 8), each reading its own rows: equal
to one process over 8 devices, and a one-process checkpoint resumed by two processes."""
import json

import jax
import numpy as np

from scm_jax import checkpoint as ckpt
from scm_jax import train
from tests.helpers import finish_processes, load_experiment, start_two_processes, tiny_latents

LATENT_OVERRIDES = ["--config.mesh.data=1", "--config.mesh.fsdp=8",
                    "--config.teacher.sample_every=-1", "--config.teacher.optimizer.eps=0.001",
                    "--config.data.num_threads=1"]


def test_fsdp_across_the_process_boundary_on_each_process_data_shard(tmp_path):
    tiny_latents(tmp_path / "latents")
    spec = "experiments/imagenet512.py:variant=runlocal,stage=teacher"
    overrides = LATENT_OVERRIDES + [f"--config.data.path={tmp_path / 'latents'}"]
    finish_processes(start_two_processes(tmp_path / "two", spec, overrides))
    config = load_experiment("imagenet512", "variant=runlocal,stage=teacher",
                             [o[len("--config."):] for o in overrides])
    single = train.train_stage(config, "teacher", str(tmp_path / "one"), log=lambda m: None)
    specs = {str(leaf.sharding.spec) for leaf in jax.tree.leaves(single.nets["net"].params)}
    assert any("fsdp" in spec for spec in specs)
    ema, step = ckpt.restore_stage_ema(config, "teacher", str(tmp_path / "two"))
    assert step == config.teacher.steps
    for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(single.nets["net"].ema)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6)
    # The reverse: two processes resume the one-process checkpoint at its data position.
    outputs = finish_processes(start_two_processes(tmp_path / "one", spec,
                                                   overrides + ["--config.teacher.steps=6"]))
    assert "resumed from step 4" in outputs[0][0]
    rows = (tmp_path / "one" / "teacher" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [2, 4, 6]
