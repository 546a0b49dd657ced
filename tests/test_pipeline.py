"""The digits pipeline (teacher -> sCD, sCT -> evaluation), run by executing the quickstart
notebook top to bottom (its seconds-long SCM_QUICK version), then checked here. (dsCD trains
through the same loop in tests/test_train.py.)"""
import json
import os
import sys

import numpy as np
import pytest

from scm_jax import main as entry
from tests.helpers import REPO, load_experiment

pytestmark = pytest.mark.slow   # the fast loop: -m 'not slow'


def _execute_notebook(workdir, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("SCM_QUICK", "1")
    monkeypatch.setenv("SCM_WORKDIR", str(workdir))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # The kernel spec starts `python` from PATH: make it this interpreter (the one with the
    # package installed), whatever else PATH or pyenv would pick.
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    notebook = nbformat.read(os.path.join(REPO, "notebooks", "quickstart.ipynb"), as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=900, kernel_name="python3",
        resources={"metadata": {"path": os.path.join(REPO, "notebooks")}})
    client.execute()
    return notebook


def test_quickstart_notebook_runs_the_tiny_pipeline(tmp_path, monkeypatch):
    notebook = _execute_notebook(tmp_path, monkeypatch)
    errors = [o for cell in notebook.cells if cell.cell_type == "code"
              for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    results = json.loads((tmp_path / "results.json").read_text())
    models = [(r["model"], r["nfe"]) for r in results["rows"]]
    assert models == [("data (held-out)", 0), ("teacher", 3), ("teacher", 5), ("scd", 1), ("scd", 2),
                      ("sct", 1), ("sct", 2)]
    for r in results["rows"]:
        assert np.isfinite(r["fd"]) and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
    assert results["rows"][0]["fd"] < min(r["fd"] for r in results["rows"][1:])  # the floor
    for model, nfe in models[1:]:
        with np.load(tmp_path / "samples" / f"{model}_{nfe}.npz") as f:
            assert f["images"].shape == (64, 8, 8, 1) and f["labels"].shape == (64,)
            assert f["images"].min() >= -1 and f["images"].max() <= 1
        assert (tmp_path / "eval" / f"{model}_{nfe}.png").exists()
    text = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for o in cell.get("outputs", []))
    assert "| model | NFE | guidance | FD |" in text and "teacher  NFE   5: FD" in text
    assert not (tmp_path / "dscd").exists()
    for stage in ("teacher", "scd", "sct"):
        metrics = (tmp_path / stage / "metrics.jsonl").read_text().splitlines()
        assert json.loads(metrics[-1])["step"] == 4
        assert any(name.endswith(".png") for name in os.listdir(tmp_path / stage))
    # The notebook's plots and its sample from the sCD checkpoint.
    for plot in ("losses.png", "grids.png", "fd_vs_nfe.png", "scd_2step.png"):
        assert (tmp_path / "plots" / plot).stat().st_size > 1000
    # Re-running the finished command trains nothing more: every stage resumes at its end.
    config = load_experiment("digits", "variant=tiny", ["mesh.data=1", "stage=scd"])
    lines = []
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
