"""docs/config.md is generated from the config schemas and current."""
import subprocess
import sys

from scm_jax import config_reference, objectives
from tests.helpers import REPO


def test_docs_config_md_is_current():
    proc = subprocess.run([sys.executable, "-m", "scm_jax.config_reference", "--check"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_every_key_is_listed_with_its_meaning(tmp_path):
    text = config_reference.generate()
    for name in objectives.OBJECTIVES:
        for key, _ in config_reference._flatten(objectives.section(name)):
            if not key.startswith(("optimizer.", "ema.")):
                assert f"| `{key}` |" in text, (name, key)
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert rows and all(not line.endswith("|  |") for line in rows)   # every key described
    stale = tmp_path / "config.md"
    stale.write_text(text.replace("| `steps` |", "| `stepz` |", 1))
    assert config_reference.main([f"--out={stale}", "--check"]) == 1
