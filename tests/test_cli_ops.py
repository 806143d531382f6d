"""``edgesplit deploy`` / ``status`` / ``undeploy`` against a real 2-worker cluster, and one-line usage errors.

The cluster is real (a coordinator and two worker daemons on 127.0.0.1) and serves a
6-block dummy model (each block adds 1), so a result says that every block ran once.
User mistakes (an endpoint without tcp:// or a port, a bad plan file) must end with exit
status 2 and one line on stderr, before anything connects.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from edgesplit.runtime import cli

EDGESPLIT = [sys.executable, "-m", "edgesplit.runtime.cli"]
MODEL = "dummy6"


@pytest.fixture(scope="module")
def ops_cluster(tmp_path_factory: pytest.TempPathFactory):
    from edgesplit.partitioner import BlockStore, partition
    from edgesplit.runtime.cluster import LocalCluster, LocalClusterConfig
    from edgesplit.runtime.dummy import build_dummy, dummy_recipe

    root = tmp_path_factory.mktemp("ops-store")
    partition(build_dummy(n_blocks=6), MODEL, dummy_recipe(6), BlockStore(root), input_shape=[4], profile=False)
    lc = LocalCluster(LocalClusterConfig(workers=2, port=0, torch_threads=1), store=root)
    lc.start(timeout_s=60)
    try:
        yield lc
    finally:
        lc.stop()


def _status(ep: str, capsys) -> dict:
    assert cli.main(["status", "--coordinator", ep, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _one_error_line(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one stderr line, got {err!r}"
    assert lines[0].startswith(f"edgesplit {command}: error: "), lines[0]
    return lines[0]


@pytest.mark.timeout(60)
def test_deploy_status_infer_undeploy(ops_cluster, tmp_path, capsys):
    ep = ops_cluster.endpoint
    assert cli.main(["deploy", MODEL, "--coordinator", ep, "--stages", "2"]) == 0
    out = capsys.readouterr().out
    assert f"deployed {MODEL}" in out and "w0 [0:3) -> w1 [3:6)" in out, out
    assert "fetched" in out and "w0" in out and "w1" in out  # per-worker loaded bytes
    assert "fetched 1 blocks" in ops_cluster.log_tail("w0", 20_000)  # the worker's fetch progress line

    time.sleep(1.2)  # status shows the registry: what the workers said in their last heartbeats
    doc = _status(ep, capsys)
    workers = {w["name"]: w for w in doc["workers"]}
    assert set(workers) == {"w0", "w1"}
    for w in workers.values():
        assert w["state"] in ("live", "deploying") and w["health"] == "ok"
        assert 0 < w["resident_bytes"] <= w["budget_bytes"], w
        assert [s["model"] for s in w["stages"]] == [MODEL] and w["stages"][0]["resident"]
    model = next(m for m in doc["models"] if m["name"] == MODEL)
    assert model["deployed"] and model["route"]["workers"] == ["w0", "w1"]
    assert [(h["start"], h["end"], h["workers"]) for h in model["route"]["hops"]] == [(0, 3, ["w0"]), (3, 6, ["w1"])]

    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.save(tmp_path / "x.npy", x)
    assert cli.main(["infer", "--coordinator", ep, "--model", MODEL, "--input", str(tmp_path / "x.npy"),
                     "--output", str(tmp_path / "y.npy"), "--top", "0"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), x + 6)
    capsys.readouterr()
    time.sleep(1.3)  # the next heartbeat carries the stage statistics and counters
    doc = _status(ep, capsys)
    stage = next(w for w in doc["workers"] if w["name"] == "w1")["stages"][0]
    assert stage["n"] >= 1 and stage["compute_ms_p50"] >= 0 and stage["errors"] == 0
    assert next(w for w in doc["workers"] if w["name"] == "w0")["outcomes"]["computed"] >= 1

    assert cli.main(["status", "--coordinator", ep]) == 0  # the tables
    out = capsys.readouterr().out
    assert "hop 0 blocks [0:3): w0 p50" in out and "health" in out and "computed" in out
    assert cli.main(["workers", "--coordinator", ep]) == 0  # the old name still works
    assert MODEL in capsys.readouterr().out

    assert cli.main(["undeploy", MODEL, "--coordinator", ep]) == 0
    out = capsys.readouterr().out
    assert f"undeployed {MODEL}" in out and "w0" in out and "w1" in out
    model = next(m for m in _status(ep, capsys)["models"] if m["name"] == MODEL)
    assert not model["deployed"] and model["route"] is None
    assert cli.main(["status", "--coordinator", ep]) == 0
    assert "(not deployed)" in capsys.readouterr().out


@pytest.mark.timeout(60)
def test_deploy_a_plan_file(ops_cluster, tmp_path, capsys):
    ep = ops_cluster.endpoint
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"model": MODEL, "stages": [["w1", 0, 2], {"worker": "w0", "start": 2, "end": 6}],
                                "links": [None]}))
    assert cli.main(["deploy", MODEL, "--coordinator", ep, "--plan", str(plan)]) == 0
    assert "w1 [0:2) -> w0 [2:6)" in capsys.readouterr().out
    with ops_cluster.client() as cl:
        x = np.ones((1, 4), dtype=np.float32)
        np.testing.assert_array_equal(cl.infer(MODEL, x).numpy(), x + 6)
    # what `edgesplit plan --json` prints is a plan file too (its "plan" part)
    planned = {"measurements": {"model": MODEL}, "plan": {
        "stages": [{"worker": "w0", "start": 0, "end": 6, "compute_ms": 0.1}],
        "hops": [{"src": "client", "dst": "w0", "codec": None}, {"src": "w0", "dst": "client", "codec": None}]}}
    plan.write_text(json.dumps(planned))
    assert cli.main(["deploy", MODEL, "--coordinator", ep, "--plan", str(plan)]) == 0
    assert "w0 [0:6)" in capsys.readouterr().out
    assert cli.main(["undeploy", MODEL, "--coordinator", ep]) == 0
    capsys.readouterr()
    assert cli.main(["deploy", MODEL, "--coordinator", ep, "--workers", "w0,nope"]) == 2
    assert "--workers names workers ['nope']" in _one_error_line(capsys.readouterr().err, "deploy")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("content,needs", [
    ("{not json", "not JSON"),
    ('{"steps": []}', "unknown keys ['steps']"),
    ('{"stages": []}', "non-empty list"),
    ('{"stages": [["w0", 3, 1]]}', "stage 0 is"),
    ('{"model": "other", "stages": [["w0", 0, 6]]}', "plan for 'other'"),
    ('{"stages": [["w0", 0, 6]], "links": [{"codec": "raw", "speed": 1}]}', "link 0 is"),
    ('{"stages": [["w0", 0, 2], ["w1", 3, 6]]}', "dummy6"),  # a gap: the cluster's block count tells
    ('{"stages": [["w0", 0, 2], ["w1", 2, 6]], "links": []}', "1 cuts"),
    ('{"stages": [["nope", 0, 6]]}', "names workers ['nope'] that are not registered"),
])
def test_a_bad_plan_file_is_one_line_and_status_2(ops_cluster, tmp_path, capsys, content, needs):
    plan = tmp_path / "plan.json"
    plan.write_text(content)
    assert cli.main(["deploy", MODEL, "--coordinator", ops_cluster.endpoint, "--plan", str(plan)]) == 2
    line = _one_error_line(capsys.readouterr().err, "deploy")
    assert f"plan file {plan}" in line and needs in line, line


@pytest.mark.timeout(30)
@pytest.mark.parametrize("argv,flag", [
    (["status", "--coordinator", "127.0.0.1:5555"], "--coordinator 127.0.0.1:5555 is not an endpoint"),
    (["infer", "--coordinator", "tcp://host", "--model", MODEL, "--input", "x.npy"], "--coordinator tcp://host has no"),
    (["deploy", MODEL, "--coordinator", "tcp://h:99999", "--stages", "2"], "port '99999'"),
    (["undeploy", MODEL, "--coordinator", "tcp://*:5555"], "'*' only makes sense where a daemon binds"),
    (["worker", "--bind", "127.0.0.1:5600"], "--bind 127.0.0.1:5600 is not an endpoint"),
    (["coordinator", "--bind", "tcp://*"], "--bind tcp://* has no port"),
])
def test_a_bad_endpoint_is_one_line_and_status_2(argv, flag, capsys):
    assert cli.main(argv) == 2
    line = _one_error_line(capsys.readouterr().err, argv[0])
    assert flag in line and "e.g." in line and "tcp://" in line.split("e.g.")[1], line


@pytest.mark.timeout(60)
def test_the_command_line_itself_exits_2_with_one_line():
    out = subprocess.run([*EDGESPLIT, "--log-level", "debug", "status", "--coordinator", "127.0.0.1:5555"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    assert "e.g. --coordinator tcp://127.0.0.1:5555" in _one_error_line(out.stderr, "status")
    out = subprocess.run([*EDGESPLIT, "deploy"], capture_output=True, text=True, timeout=60)  # argparse's own
    assert out.returncode == 2 and "required: model" in _one_error_line(out.stderr, "deploy")


def test_log_level_is_global_and_per_command():
    for argv in (["--log-level", "debug", "status"], ["status", "--log-level", "debug"]):
        command = cli._command_in(argv, cli.commands())
        assert command == "status"
        assert cli.build_parser(command).parse_args(argv).log_level == "debug"
    args = cli.build_parser("worker").parse_args(["--log-level", "error", "worker"])
    from edgesplit.runtime.worker import WorkerConfig

    assert cli._build(WorkerConfig, args, "worker").log_level == "error"  # the daemons take the global one


def test_a_missing_extra_is_named(monkeypatch):
    from edgesplit.partitioner.errors import UsageError
    from edgesplit.runtime import extras

    extras.require_extra("images", "reading images")  # installed with the test extra
    monkeypatch.setitem(extras.EXTRAS, "images", ("edgesplit_no_such_module", "Pillow"))
    with pytest.raises(UsageError, match=r"^reading x.png needs Pillow: pip install 'edgesplit\[images\]' "
                                         r"\(or pass a .npy array\)$"):
        extras.require_extra("images", "reading x.png", "or pass a .npy array")


# --- user mistakes: one line, exit 2, nothing created, nothing sent ------------------------------
def _dead_endpoint() -> str:
    """A loopback endpoint nothing listens on (a port just freed)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("argv", [["undeploy", MODEL], ["deploy", MODEL, "--stages", "2"]])
def test_a_silent_coordinator_fails_within_the_control_timeout(argv, capsys):
    t0 = time.monotonic()  # not the deploy timeout (300 s): a hello goes first
    assert cli.main([*argv, "--coordinator", _dead_endpoint(), "--control-timeout-ms", "1000"]) == 1
    assert time.monotonic() - t0 < 10
    assert "did not answer the hello in time" in _one_error_line(capsys.readouterr().err, argv[0])


@pytest.mark.timeout(30)
@pytest.mark.parametrize("argv,needs", [
    (["status", "--coordinator", "tcp://:5555"], "has no host, e.g. --coordinator tcp://10.0.0.1:5555"),
    (["status", "--coordinator", "tcp://127.0.0.1:5555/foo"], "takes no path"),
    (["status", "--coordinator", "tcp://[::1:5555"], "unbalanced brackets"),
    (["worker", "--coordinator", "tcp://[::1]"], "has no port, e.g. --coordinator tcp://[::1]:5555"),
    (["coordinator", "--metrics-bind", "9464"], "--metrics-bind 9464 is not HOST:PORT, e.g."),
    (["coordinator", "--metrics-bind", "0.0.0.0:99999"], "port '99999' is not 0-65535"),
    (["coordinator", "--metrics-bind", "tcp://0.0.0.0:9464"], "HOST:PORT without a scheme"),
    (["coordinator", "--keys", "/nonexistent/keys"], "key directory /nonexistent/keys does not exist"),
    (["worker", "--keys", "/nonexistent/keys"], "key directory /nonexistent/keys does not exist"),
    (["worker", "--device", "tpu"], "--device 'tpu' is not a device; use cpu, cuda, cuda:N"),
    (["worker", "--device", "cuda:abc"], "--device 'cuda:abc' is not a device"),
    (["worker", "--device", "cuda:99"], "CUDA device"),  # none, or fewer than 100
])
def test_a_daemon_or_endpoint_mistake_creates_nothing(argv, needs, tmp_path, capsys):
    store = tmp_path / "store"
    daemon = ["--bind", "tcp://127.0.0.1:0", "--store", str(store)] if argv[0] in cli.DAEMONS else []
    assert cli.main([*argv, *daemon]) == 2
    assert needs in _one_error_line(capsys.readouterr().err, argv[0])
    assert not store.exists()  # checked before the store (or any socket) was made


@pytest.mark.timeout(30)
def test_a_device_from_the_environment_is_checked_too(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EDGESPLIT_DEVICE", "gpu")
    assert cli.main(["worker", "--bind", "tcp://127.0.0.1:0", "--store", str(tmp_path / "ws")]) == 2
    assert "--device 'gpu' is not a device" in _one_error_line(capsys.readouterr().err, "worker")
    assert not (tmp_path / "ws").exists()


def _png_header(path, width: int, height: int) -> None:
    """A PNG that only claims its size (no pixels): enough for Pillow's decompression-bomb check."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


@pytest.mark.timeout(30)
def test_bad_input_files_are_one_line(tmp_path, recwarn):
    from edgesplit.partitioner.errors import UsageError
    from edgesplit.runtime.inputs import load_input

    np.savez(tmp_path / "a.npz", x=np.ones(4))
    (tmp_path / "a.npz").rename(tmp_path / "npz.npy")
    np.save(tmp_path / "str.npy", np.array(["a", "b", "c", "d"]))
    np.save(tmp_path / "cplx.npy", np.ones(4, dtype=complex))
    np.save(tmp_path / "shape.npy", np.ones((2, 5), dtype=np.float32))
    _png_header(tmp_path / "bomb.png", 30000, 30000)  # past twice Pillow's cap: its error
    _png_header(tmp_path / "big.png", 12000, 12000)  # between its cap and twice it: only a warning from Pillow
    (tmp_path / "dir.png").mkdir()
    for name, shape, needs in [("npz.npy", [4], "is an .npz archive, not an .npy array"),
                               ("str.npy", [4], "holds <U1 values; the model takes numbers"),
                               ("cplx.npy", [4], "holds complex128 values"),
                               ("shape.npy", [4], "shape [2, 5], but the model takes [4] per sample"),
                               ("bomb.png", [3, 8, 8], "too large to read safely"),
                               ("big.png", [3, 8, 8], "too large to read safely"),
                               ("dir.png", [3, 8, 8], "is a directory")]:
        with pytest.raises(UsageError, match=re.escape(needs)):
            load_input(str(tmp_path / name), shape)
    assert not [w for w in recwarn if "DecompressionBomb" in type(w.message).__name__]
    np.save(tmp_path / "u8.npy", np.arange(4, dtype=np.uint8))
    assert load_input(str(tmp_path / "u8.npy"), [4]).dtype == torch.float32


@pytest.mark.timeout(30)
@pytest.mark.parametrize("extra,needs", [
    (["--output", "/nonexistent/dir/o.npy"], "directory /nonexistent/dir does not exist"),
    (["--input", "DIR"], "is a directory"),
])
def test_infer_checks_its_files_before_connecting(extra, needs, tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.ones(4, dtype=np.float32))
    argv = ["infer", "--coordinator", _dead_endpoint(), "--model", MODEL, "--input", str(tmp_path / "x.npy"), *extra]
    t0 = time.monotonic()  # a dead coordinator: had it connected first, it would wait for the control timeout
    assert cli.main([str(tmp_path) if a == "DIR" else a for a in argv]) == 2
    assert time.monotonic() - t0 < 5
    assert needs in _one_error_line(capsys.readouterr().err, "infer")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("argv,needs", [
    (["deploy", MODEL, "--stages", "20"], f"--stages 20: {MODEL} has 6 blocks, so 1..6 stages"),
    (["deploy", MODEL, "--workers", "w0,w0"], "--workers names w0 more than once"),
    (["deploy", MODEL, "--replicas", "3"], "--replicas 3 needs at least 3 workers, but the coordinator has 2"),
    (["deploy", MODEL, "--replicas", "2", "--workers", "w1"], "--workers names 1 (w1); give --replicas 1..1"),
    (["infer", "--model", MODEL, "--input", "BAD"], "shape [2, 5], but the model takes [4] per sample"),
])
def test_what_the_coordinator_would_refuse_is_refused_before_sending(ops_cluster, argv, needs, tmp_path, capsys):
    if argv[0] == "infer":
        with ops_cluster.client() as cl:
            cl.deploy(MODEL, n_stages=2)  # so that it has a route
    np.save(tmp_path / "bad.npy", np.ones((2, 5), dtype=np.float32))
    argv = [str(tmp_path / "bad.npy") if a == "BAD" else a for a in argv]
    assert cli.main([*argv, "--coordinator", ops_cluster.endpoint]) == 2
    assert needs in _one_error_line(capsys.readouterr().err, argv[0])


@pytest.mark.timeout(30)
def test_a_deeply_nested_plan_file_is_one_line(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text("[" * 100_000)
    assert cli.main(["deploy", MODEL, "--plan", str(plan), "--coordinator", _dead_endpoint()]) == 2
    assert "nested too deeply" in _one_error_line(capsys.readouterr().err, "deploy")
    plan.write_text(" " * (1024**2 + 1))
    assert cli.main(["deploy", MODEL, "--plan", str(plan), "--coordinator", _dead_endpoint()]) == 2
    assert "too large for a plan" in _one_error_line(capsys.readouterr().err, "deploy")
