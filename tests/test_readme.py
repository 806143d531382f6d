"""The README's Python scripts run exactly as written.

The first starts its own cluster; the second talks to the cluster ``EDGESPLIT_COORDINATOR``
names, after the README's ``train-codec`` command (here on 128 digits for one epoch, measured on 64:
the script needs the codec, not its accuracy). Each runs in its own process, in a scratch
directory, as a user would paste it.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    """The ```python fenced blocks of the README, in order."""
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def _run_script(code: str, cwd: Path, env: dict[str, str], timeout: float) -> str:
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, (f"README script failed ({r.returncode}):\n{code}\n--- stdout\n{r.stdout}\n"
                               f"--- stderr\n{r.stderr}")
    return r.stdout


def test_the_readme_has_the_two_scripts():
    blocks = python_blocks()
    assert len(blocks) == 2 and "LocalCluster" in blocks[0] and "connect()" in blocks[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_readme_scripts_run_as_written(tmp_path):
    from edgesplit.runtime.cluster import LocalCluster, LocalClusterConfig

    local, remote = python_blocks()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGESPLIT_")}
    out = _run_script(local, tmp_path, env, timeout=600)
    assert "stages" in out  # the placement's prediction was printed

    train = ["train-codec", "vit_tiny_patch16_224", "--store", "./store", "--cut", "7", "--images", "digits",
             "--epochs", "1", "--train-limit", "128", "--eval-limit", "64", "--no-progress"]
    r = subprocess.run([sys.executable, "-m", "edgesplit.runtime.cli", *train], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr

    with LocalCluster(LocalClusterConfig(workers=2, port=0, torch_threads=1), store=tmp_path / "store") as lc:
        out = _run_script(remote, tmp_path, {**env, "EDGESPLIT_COORDINATOR": lc.endpoint}, timeout=600)
    assert "freed_bytes" in out and "w0" in out
