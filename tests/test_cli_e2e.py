"""A whole deployment driven through the ``edgesplit`` command only, as a user on real boards would.

Every step is a separate ``edgesplit`` process: a coordinator and two worker daemons, then
partition, deploy, infer on a PNG, status, train-codec on digits, link with that codec,
infer again, metrics, undeploy. Nothing is imported from edgesplit except to read the answers.
The model is a small timm ViT (vit_tiny at 32 px, patch 4, 10 classes) with random weights:
the point is the plumbing, not the accuracy (benchmarks/codec_user.py measures that).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from edgesplit.runtime.cluster import free_port

EDGESPLIT = [sys.executable, "-m", "edgesplit.runtime.cli"]
MODEL = "vit32"
VIT = ["vit_tiny_patch16_224", "--name", MODEL, "--kwarg", "img_size=32", "--kwarg", "patch_size=4",
       "--kwarg", "num_classes=10"]


def _run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGESPLIT_")}
    return subprocess.run([*EDGESPLIT, *args], capture_output=True, text=True, timeout=timeout, env=env)


def _ok(*args: str, timeout: float = 240) -> str:
    r = _run(*args, timeout=timeout)
    assert r.returncode == 0, f"edgesplit {' '.join(args)} -> {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def _daemon(log: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGESPLIT_")}
    env["EDGESPLIT_PARENT_PID"] = str(os.getpid())
    return subprocess.Popen([*EDGESPLIT, *args], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def _status(ep: str) -> dict:
    return json.loads(_ok("status", "--coordinator", ep, "--json"))


def _link_bytes(mport: int) -> tuple[float, float]:
    """(bytes, messages) sent so far on every worker-to-worker link, from the coordinator's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read().decode()
    got = {"edgesplit_link_sent_bytes": 0.0, "edgesplit_link_sent_messages": 0.0}
    for fam in text_string_to_metric_families(text):
        if fam.name in got:
            got[fam.name] += sum(s.value for s in fam.samples if s.name.endswith("_total"))
    return got["edgesplit_link_sent_bytes"], got["edgesplit_link_sent_messages"]


def _wait(what: str, ok, timeout_s: float = 60.0) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if ok():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_deployment_through_the_cli_only(tmp_path):
    from PIL import Image

    store, port, mport = tmp_path / "store", free_port(), free_port()
    ep = f"tcp://127.0.0.1:{port}"
    r = _run("partition", *VIT, "--store", str(store), "--split", "6", "--no-profile")
    assert r.returncode == 0 and "random weights" in r.stderr, r.stderr
    procs = [_daemon(tmp_path / "coordinator.log", "coordinator", "--bind", ep, "--store", str(store),
                     "--metrics-bind", f"127.0.0.1:{mport}")]
    try:
        for name in ("w0", "w1"):
            procs.append(_daemon(tmp_path / f"{name}.log", "worker", "--coordinator", ep, "--name", name,
                                 "--bind", f"tcp://127.0.0.1:{free_port()}", "--store", str(tmp_path / name),
                                 "--torch-threads", "1"))
        _wait("two live workers", lambda: _run("status", "--coordinator", ep, "--json").returncode == 0
              and sum(w["state"] == "live" for w in _status(ep)["workers"]) == 2)

        out = _ok("deploy", MODEL, "--coordinator", ep, "--workers", "w0,w1", "--stages", "2")
        assert "w0" in out and "w1" in out
        png = tmp_path / "digit.png"
        Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)).save(png)
        out = _ok("infer", "--coordinator", ep, "--model", MODEL, "--input", str(png), "--output",
                  str(tmp_path / "y0.npy"))
        assert "output (1, 10)" in out, out
        st = _status(ep)
        (model,) = [m for m in st["models"] if m["name"] == MODEL]
        assert model["deployed"] and [h["workers"] for h in model["route"]["hops"]] == [["w0"], ["w1"]]
        assert all(w["resident_bytes"] > 0 for w in st["workers"])

        _wait("the link's bytes in /metrics", lambda: _link_bytes(mport)[1] >= 1)
        raw_bytes, raw_msgs = _link_bytes(mport)
        out = _ok("train-codec", MODEL, "--store", str(store), "--cut", "6", "--images", "digits", "--epochs", "1",
                  "--train-limit", "256", "--eval-limit", "64", "--budgets", "8,32", "--no-progress", timeout=400)
        manifest = json.loads((store / "models" / f"{MODEL}.json").read_text())
        assert "cut6" in manifest["extra"]["codecs"]
        out = _ok("link", "--coordinator", ep, "--model", MODEL, "--cut", "0", "--codec", "cut6", "--budget", "8",
                  "--wire-dtype", "int8")
        assert "cut6" in out
        _ok("infer", "--coordinator", ep, "--model", MODEL, "--input", str(png), "--output", str(tmp_path / "y1.npy"))
        assert np.load(tmp_path / "y1.npy").shape == (1, 10)
        _wait("the coded transfer in /metrics", lambda: _link_bytes(mport)[1] > raw_msgs)
        coded_bytes, coded_msgs = _link_bytes(mport)
        per_raw, per_coded = raw_bytes / raw_msgs, (coded_bytes - raw_bytes) / (coded_msgs - raw_msgs)
        assert per_coded * 16 < per_raw, (per_raw, per_coded)  # 8 of 192 channels as int8: ~1/90 of fp32

        out = _ok("undeploy", MODEL, "--coordinator", ep)
        (model,) = [m for m in _status(ep)["models"] if m["name"] == MODEL]
        assert not model["deployed"]
        r = _run("infer", "--coordinator", ep, "--model", MODEL, "--input", str(png))
        assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
