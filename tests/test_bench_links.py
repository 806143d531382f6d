"""The link harness that ``benchmarks/transport.py`` and ``benchmarks/curve.py`` share runs end to end.

One short round of each kind at 4 MiB (256 messages), real processes and sockets. curve.py imports
transport.py's harness, so a change to it that breaks either script fails here rather than in a
benchmark run much later.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _run(script: str, *args: str, out: Path) -> dict:
    r = subprocess.run([sys.executable, str(BENCH / script), "--part", "transfer", "--sizes", "4096",
                        "--repeats", "1", "--out", str(out), *args], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, f"{script} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return json.loads(out.read_text())


def test_transport_harness_with_floors(tmp_path: Path) -> None:
    res = _run("transport.py", "--kinds", "edgesplit,bare,bare-noack", out=tmp_path / "t.json")
    (row,) = res["transfer"]
    assert row["size_bytes"] == 4 << 20
    for kind in ("raw", "edgesplit", "bare", "bare-noack"):
        assert row[kind]["gb_per_s"] > 0, kind
        assert len(row[kind]["rounds"]) == 1, kind
    assert row["edgesplit"]["msgs_per_ack"] > 0 and row["bare"]["msgs_per_ack"] > 0  # custody: ACKs came back
    assert row["bare-noack"]["msgs_per_ack"] == 0  # no custody, no ACK
    assert row["ratio"] == row["edgesplit"]["ratio"] > 0
    if os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/schedstat"):
        assert row["edgesplit"]["python_us"] > 0 and row["edgesplit"]["io_us"] > 0


def test_transport_refuses_unknown_kind(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(BENCH / "transport.py"), "--kinds", "edgesplit,fast"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown fast" in r.stderr


def test_curve_harness(tmp_path: Path) -> None:
    res = _run("curve.py", out=tmp_path / "c.json")
    (row,) = res["transfer"]
    assert row["ratio"] > 0 and row["curve"]["us_per_msg"] > 0 and row["open"]["us_per_msg"] > 0
