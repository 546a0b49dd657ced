"""The path layer (`scm_jax.files`) and what goes through it, on a bucket: an in-memory
filesystem registered for gs:// stands in for Google Cloud Storage (etils.epath reaches buckets
through fsspec, as it would through gcsfs), so nothing here touches the network."""
import json

import numpy as np
import pytest

from scm_jax import checkpoint as ckpt

from scm_jax import stage_identity
from scm_jax import files, objectives
from scm_jax.evaluation import digits_classifier
from scm_jax.metrics_log import MetricLogger, image_grid, save_image_grid
from tests.helpers import load_experiment


@pytest.fixture
def bucket(fake_bucket):
    """gs://bucket/run on the in-memory bucket (conftest's fake_bucket)."""
    return "gs://bucket/run"


def test_writes_land_whole_and_leave_no_temporaries(bucket, fake_bucket):
    files.write_json(f"{bucket}/a/config.json", {"b": (1, 2)})
    assert files.read_json(f"{bucket}/a/config.json") == {"b": [1, 2]}
    images = np.random.default_rng().uniform(-1, 1, (5, 8, 8, 1)).astype(np.float32)
    files.save_npz(f"{bucket}/samples/x.npz", images=images, labels=np.arange(5))
    loaded = files.load_npz(f"{bucket}/samples/x.npz")
    np.testing.assert_array_equal(loaded["images"], images)
    save_image_grid(images, f"{bucket}/grid.png", rows=1)
    from PIL import Image
    import io

    with files.path(f"{bucket}/grid.png").open("rb") as f:
        pixels = np.asarray(Image.open(io.BytesIO(f.read())))
    np.testing.assert_array_equal(pixels, image_grid(images, rows=1))
    assert sorted(fake_bucket.store) == [f"{bucket}/a/config.json", f"{bucket}/grid.png",
                          f"{bucket}/samples/x.npz"]
    assert not files.is_local(bucket) and files.is_local("/tmp/x")


def test_metrics_on_a_bucket_are_rewritten_strict_and_truncated_on_resume(bucket, monkeypatch):
    monkeypatch.setattr(MetricLogger, "_writer", lambda self: type(
        "NoTensorBoard", (), {"add_scalar": lambda *a: None, "close": lambda *a: None})())
    logger = MetricLogger(f"{bucket}/teacher", name="teacher", total_steps=3, log=lambda m: None)
    for step, loss in ((1, 0.5), (2, float("nan")), (3, 0.25)):
        logger.write(step, {"loss": loss})
    rows = [json.loads(r) for r in files.read_text(f"{bucket}/teacher/metrics.jsonl").splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[1]["loss"] is None   # NaN -> null
    MetricLogger(f"{bucket}/teacher", name="teacher", total_steps=3, log=lambda m: None,
                 resume_step=2)
    rows = files.read_text(f"{bucket}/teacher/metrics.jsonl").splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2]


def test_stage_records_and_the_classifier_live_on_a_bucket(bucket):
    config = load_experiment("digits", "variant=tiny")
    record = stage_identity.stage_record(config, objectives.build(config, "teacher"))
    stage_identity.write_record(f"{bucket}/teacher", record)
    stage_identity.check_stage_config(f"{bucket}/teacher", record)
    config.model.channels = 16
    with pytest.raises(ckpt.CheckpointMismatchError, match="model.channels = 8 there, 16 now"):
        stage_identity.check_stage_config(f"{bucket}/teacher", stage_identity.stage_record(
            config, objectives.build(config, "teacher")))
    assert not ckpt.has_checkpoint(f"{bucket}/teacher")
    params = digits_classifier._init_params(3)
    digits_classifier.save_classifier(params, f"{bucket}/eval/clf.msgpack")
    loaded = digits_classifier.load_classifier(f"{bucket}/eval/clf.msgpack")
    np.testing.assert_array_equal(loaded["params"]["Dense_0"]["kernel"],
                                  params["params"]["Dense_0"]["kernel"])
