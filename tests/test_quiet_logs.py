"""What a run prints is the package's own news: no library warning repeats what the package has
already reported (a non-finite step in TensorBoard), and resuming uses orbax's current API
(no deprecation warning)."""
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np

from scm_jax import checkpoint as ckpt
from scm_jax.metrics_log import MetricLogger


def test_a_non_finite_metric_is_written_to_jsonl_but_not_to_tensorboard(tmp_path, caplog):
    lines = []
    log = MetricLogger(tmp_path, name="teacher", total_steps=4, log=lines.append)
    value = float(np.random.default_rng().uniform(1, 2))
    with caplog.at_level(logging.WARNING):
        log.write(1, {"loss": value})
        log.write(2, {"loss": float("nan"), "grad_norm": value})
        log.close()
    assert not [r for r in caplog.records if "NaN or Inf" in r.getMessage()]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == value and rows[1]["grad_norm"] == value
    assert not isinstance(rows[1]["loss"], float)   # strict JSON: the non-finite value as text
    assert any("step 2/4" in line for line in lines)


def test_resuming_reads_the_steps_without_deprecation_warnings(tmp_path, caplog):
    state = {"w": jnp.asarray(np.random.default_rng().normal(size=(3,)), jnp.float32)}
    store = ckpt.CheckpointStore(tmp_path / "stage", async_save=False)
    store.save(3, state, {"step": 3})
    store.close()
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    store = ckpt.CheckpointStore(tmp_path / "stage", async_save=False)
    with caplog.at_level(logging.WARNING):
        restored, data, step = store.restore_latest_intact(abstract, log=lambda m: None)
    store.close()
    assert step == 3 and data == {"step": 3}
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(state["w"]))
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()]
