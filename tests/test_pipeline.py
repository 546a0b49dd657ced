"""The whole digits pipeline (teacher -> sCD, sCT, dsCD -> evaluation) through the entry point."""
import json
import os

import numpy as np

from scm_jax import main as entry
from tests.helpers import load_experiment


def test_tiny_pipeline_writes_samples_results_and_table(tmp_path):
    config = load_experiment("digits", "variant=tiny")
    config.mesh.data = 1
    lines = []
    entry.run(config, str(tmp_path), log=lambda m: lines.append(str(m)))
    results = json.loads((tmp_path / "results.json").read_text())
    models = [(r["model"], r["nfe"]) for r in results["rows"]]
    assert models == [("data (held-out)", 0), ("teacher", 3), ("teacher", 5), ("scd", 1), ("scd", 2),
                      ("sct", 1), ("sct", 2), ("dscd", 1), ("dscd", 2)]
    for r in results["rows"]:
        assert np.isfinite(r["fd"]) and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
    assert results["rows"][0]["fd"] < min(r["fd"] for r in results["rows"][1:])  # the floor
    for model, nfe in models[1:]:
        with np.load(tmp_path / "samples" / f"{model}_{nfe}.npz") as f:
            assert f["images"].shape == (64, 8, 8, 1) and f["labels"].shape == (64,)
            assert f["images"].min() >= -1 and f["images"].max() <= 1
    assert any("| model | NFE | FD |" in line for line in lines)
    for stage in ("teacher", "scd", "sct", "dscd"):
        metrics = (tmp_path / stage / "metrics.jsonl").read_text().splitlines()
        assert json.loads(metrics[-1])["step"] == config[stage].steps
        assert any(name.endswith(".png") for name in os.listdir(tmp_path / stage))
    # Re-running the finished command trains nothing more: every stage resumes at its end.
    lines.clear()
    config.stage = "scd"
    entry.run(config, str(tmp_path), log=lambda m: lines.append(str(m)))
    assert any("resumed from step 4" in line for line in lines), lines


def test_dry_run_prints_config_and_parameter_count(tmp_path):
    config = load_experiment("digits")
    config.dry_run = True
    lines = []
    entry.run(config, str(tmp_path), log=lambda m: lines.append(str(m)))
    count = int(lines[-1].split(":")[1].split("(")[0].replace(",", ""))
    assert lines[-1].startswith("backbone parameters") and 100_000 < count < 5_000_000
    assert not any(tmp_path.iterdir())
