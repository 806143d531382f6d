"""A worker imports what the models it hosts need, nothing more.

On a Jetson every MiB a worker spends on imports is a MiB the block cache does not get:
``import torch`` is ~510 MiB, and ``import timm`` adds ~190 more (timm.layers imports
torchvision.ops, which imports torch._dynamo). So an idle worker, or one hosting a model
built without timm, must not import timm, torchvision, torch._dynamo or the test and
training extras. The checks read ``python -X importtime`` of real processes started the
way the CLI and LocalCluster start them, so nothing in the process is patched.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

# What no idle (or non-timm) worker needs; each costs memory the block cache could use.
FORBIDDEN = ("timm", "torchvision", "torch._dynamo", "sympy", "triton", "sklearn", "matplotlib", "PIL", "scipy",
             "edgesplit.compression.training", "edgesplit.partitioner.classwise")
_IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)\s*$")
CONSOLE_SCRIPT = Path(sys.executable).parent / "edgesplit"


def imported(stderr: str) -> set[str]:
    """Module names a ``python -X importtime`` run imported (from its stderr)."""
    return {m.group(1) for line in stderr.splitlines() if (m := _IMPORT_LINE.match(line))}


def loaded(modules: set[str], names: tuple[str, ...] = FORBIDDEN) -> list[str]:
    """Which of ``names`` (packages included with their submodules) are in ``modules``."""
    return sorted(n for n in names if any(m == n or m.startswith(n + ".") for m in modules))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("launcher", [
    pytest.param([sys.executable, "-X", "importtime", "-m", "edgesplit.runtime.cli"], id="LocalCluster/up"),
    pytest.param([sys.executable, "-X", "importtime", "-m", "edgesplit.runtime"], id="python-m"),
    pytest.param([sys.executable, "-X", "importtime", str(CONSOLE_SCRIPT)], id="console-script"),
])
def test_worker_start_path_imports_nothing_heavy(launcher: list[str]) -> None:
    """``worker --help`` builds the worker's parser, so it imports the worker package as a start does."""
    if launcher[-1] == str(CONSOLE_SCRIPT) and not CONSOLE_SCRIPT.exists():
        pytest.skip("no edgesplit console script in this environment")
    r = subprocess.run([*launcher, "worker", "--help"], capture_output=True, text=True, timeout=100)
    assert r.returncode == 0, r.stderr[-2000:]
    modules = imported(r.stderr)
    assert "edgesplit.runtime.worker.daemon" in modules and "torch" in modules  # the parse saw the real path
    assert loaded(modules) == []


@pytest.mark.timeout(180)
def test_live_worker_hosting_a_non_timm_model_imports_nothing_heavy(tmp_path: Path) -> None:
    """A real worker (LocalCluster's command line) registers, hosts a dummy stage, serves a request."""
    import torch

    from edgesplit.partitioner import BlockStore, partition
    from edgesplit.runtime import Client, ClientConfig
    from edgesplit.runtime.cluster import stable_port
    from edgesplit.runtime.dummy import build_dummy, dummy_recipe

    partition(build_dummy(3), "dummy3", dummy_recipe(3), BlockStore(tmp_path / "c"), input_shape=[4], profile=False)
    c_port = stable_port()
    endpoint = f"tcp://127.0.0.1:{c_port}"
    cli = [sys.executable, "-m", "edgesplit.runtime.cli"]
    kw = dict(stdin=subprocess.DEVNULL, start_new_session=True)
    err = open(tmp_path / "worker.stderr", "w")
    procs = [subprocess.Popen([*cli, "coordinator", "--bind", endpoint, "--store", str(tmp_path / "c")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)]
    try:
        procs.append(subprocess.Popen(
            [sys.executable, "-X", "importtime", *cli[1:], "worker", "--coordinator", endpoint, "--bind",
             f"tcp://127.0.0.1:{stable_port(taken={c_port})}", "--name", "w1", "--store", str(tmp_path / "w1"),
             "--torch-threads", "1"], stdout=subprocess.DEVNULL, stderr=err, **kw))
        with Client(ClientConfig(coordinator=endpoint, control_timeout_ms=2000)) as cl:
            cl.wait_for_workers(1, timeout_s=90)
            cl.deploy("dummy3", stages=[("w1", 0, 3)])
            y = cl.infer("dummy3", torch.zeros(2, 4))
        assert torch.equal(y, torch.full((2, 4), 3.0))  # every block ran once
        assert procs[1].poll() is None, "the worker exited"
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        err.close()
    modules = imported((tmp_path / "worker.stderr").read_text())
    assert "edgesplit.runtime.worker.deploy" in modules and "safetensors" in modules
    assert loaded(modules) == []


@pytest.mark.timeout(120)
def test_timm_is_imported_by_the_first_timm_recipe_only() -> None:
    """Building a non-timm skeleton and splitting it leaves timm unloaded; a timm recipe loads it."""
    code = """
import sys
from edgesplit.partitioner import build_skeleton, decompose, timm_recipe
from edgesplit.runtime.dummy import build_dummy, dummy_recipe

decompose(build_dummy(3))
build_skeleton(dummy_recipe(3))
before = sorted(m for m in ("timm", "torchvision") if m in sys.modules)
decompose(build_skeleton(timm_recipe("resnet18")))
print(before, "timm" in sys.modules)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=100)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split("\n")[-2] == "[] True"
