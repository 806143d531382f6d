"""The ``edgesplit`` command: help, config checks, infer, ``up`` stopped by Ctrl-C, and the demo."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from edgesplit.runtime import cli

EDGESPLIT = [sys.executable, "-m", "edgesplit.runtime.cli"]


@pytest.mark.timeout(30)
def test_top_level_help_lists_commands_without_importing_torch():
    out = subprocess.run([*EDGESPLIT, "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    for name in ("demo", "up", "worker", "coordinator", "infer", "workers", "link", "partition", "inspect"):
        assert name in out.stdout
    probe = subprocess.run([sys.executable, "-c", "import sys; from edgesplit.runtime.cli import build_parser; "
                            "build_parser(); print('torch' in sys.modules)"], capture_output=True, text=True, timeout=30)
    assert probe.stdout.strip() == "False"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", ["worker", "coordinator", "infer", "up", "demo", "workers", "link"])
def test_every_option_is_explained(command):
    parser = cli.build_parser(command)
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        if action.dest != "help":
            assert action.help and len(action.help) > 10, f"{command} --{action.dest} needs a help text"
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0


@pytest.mark.timeout(30)
def test_worker_flags_match_the_issue_and_bad_config_keys_fail(tmp_path, capsys):
    parser = cli.build_parser("worker")
    args = parser.parse_args(["worker", "--coordinator", "tcp://10.0.0.1:5555", "--bind", "tcp://*:5600",
                              "--store", "/tmp/s", "--device", "cpu", "--memory-budget", "2GiB", "--name", "n1"])
    from edgesplit.runtime.worker import WorkerConfig

    cfg = cli._build(WorkerConfig, args, "worker")
    assert (cfg.coordinator, cfg.bind, cfg.memory_budget_bytes, cfg.name) == ("tcp://10.0.0.1:5555", "tcp://*:5600",
                                                                              2 * 1024**3, "n1")
    bad = tmp_path / "w.json"
    bad.write_text('{"coordinator": "tcp://h:1", "heartbeat": 5}')
    assert cli.main(["worker", "--config", str(bad)]) == 2  # a user mistake: one line, exit 2
    assert "unknown WorkerConfig keys ['heartbeat']" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_infer_and_workers_against_a_running_cluster(cluster, tmp_path, capsys):
    cl = cluster.client()
    cl.deploy("dummy3", n_stages=3, workers=["w0", "w1", "w2"])
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.save(tmp_path / "x.npy", x)
    rc = cli.main(["infer", "--coordinator", cluster.endpoint, "--model", "dummy3", "--input", str(tmp_path / "x.npy"),
                   "--output", str(tmp_path / "y.npy"), "--top", "2"])
    assert rc == 0
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), x + 3)
    assert "w0 -> w1 -> w2" in capsys.readouterr().out
    assert cli.main(["infer", "--coordinator", cluster.endpoint, "--model", "nope", "--input",
                     str(tmp_path / "x.npy")]) == 1
    assert "UNKNOWN_MODEL" in capsys.readouterr().err
    assert cli.main(["workers", "--coordinator", cluster.endpoint]) == 0
    out = capsys.readouterr().out
    assert all(f"w{i}" in out for i in range(4)) and "dummy3" in out


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@contextlib.contextmanager
def _up(sigint: str):
    """``edgesplit up --workers 1 --model none`` with SIGINT as ``signal.<sigint>``; yields (process, its ready line).

    Through ``python -c`` so SIGINT is set first (the command line and ``main()`` are the console script's): a
    terminal's foreground job has it at its default, a background job (``cmd &`` in a script) inherits it ignored,
    and a test run started in the background would pass that on.
    """
    start = (f"import signal, sys; signal.signal(signal.SIGINT, signal.{sigint}); "
             "from edgesplit.runtime.cli import main; sys.exit(main())")
    proc = subprocess.Popen([sys.executable, "-c", start, "up", "--workers", "1", "--model", "none", "--port", "0",
                             "--torch-threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = [proc.stdout.readline()]
        while lines[-1] and "stops everything" not in lines[-1]:
            lines.append(proc.stdout.readline())
        assert lines[-1], "edgesplit up ended before it was ready:\n" + "".join(lines)
        yield proc, lines[-1].strip()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _stop(proc: subprocess.Popen, sig: int) -> str:
    """Send ``sig``; up's output once it exited 0 and left no process behind."""
    children = _descendants(proc.pid)
    assert len(children) >= 2 and all(c.is_running() for c in children)  # coordinator + 1 worker
    proc.send_signal(sig)
    try:
        out, _ = proc.communicate(timeout=30)  # read on: a full pipe must not be what holds it
    except subprocess.TimeoutExpired:  # say where it hangs: SIGUSR1 dumps every thread's stack
        proc.send_signal(signal.SIGUSR1)
        time.sleep(2)
        proc.kill()
        pytest.fail(f"edgesplit up did not stop within 30 s of {signal.Signals(sig).name}; its output and stacks:\n"
                    + proc.communicate()[0][-6000:])
    assert proc.returncode == 0 and "stopping the cluster" in out, out
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"left behind: {alive}"
    return out


@pytest.mark.timeout(90)
def test_up_runs_until_ctrl_c_and_leaves_nothing_behind():
    with _up("default_int_handler") as (proc, ready):
        assert ready == "Ctrl-C stops everything."
        proc.send_signal(signal.SIGUSR1)  # prints every thread's stack, and it runs on
        time.sleep(1)
        assert proc.poll() is None
        out = _stop(proc, signal.SIGINT)
        assert "most recent call first" in out and "_run_up" in out, out  # the SIGUSR1 dump, main thread's too


@pytest.mark.timeout(90)
def test_up_started_in_the_background_says_how_to_stop_it_and_sigterm_does():
    """A background job's SIGINT is ignored, so up does not promise Ctrl-C; SIGTERM stops it as cleanly."""
    with _up("SIG_IGN") as (proc, ready):
        assert ready == f"kill {proc.pid} (SIGTERM) stops everything."
        _stop(proc, signal.SIGTERM)


@pytest.mark.timeout(120)
def test_demo_prints_the_report_and_exits_0():
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = subprocess.run([*EDGESPLIT, "demo", "--inputs", "8", "--in-flight", "4", "--no-progress"],
                         capture_output=True, text=True, timeout=110, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    for text in ("compute ms p50", "bytes/request", "transfer ms", "latency", "p95", "throughput",
                 "max |split - unsplit|", "OK", "8 ok, 0 failed"):
        assert text in out.stdout, f"{text!r} missing from the report:\n{out.stdout}"
