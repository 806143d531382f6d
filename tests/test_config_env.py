"""Settings from EDGESPLIT_* environment variables: names, types, precedence, and what is left alone.

The CLI layers defaults < config file < environment < flags (``cli._build``); the environment is
checked exactly like a config file, and a bad value names its variable.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from edgesplit.runtime import cli
from edgesplit.runtime.config import CHILD_ENV, env_names, from_env, load_file
from edgesplit.runtime.coordinator import CoordinatorConfig
from edgesplit.runtime.errors import ConfigError
from edgesplit.runtime.worker import WorkerConfig


@pytest.mark.timeout(10)
def test_every_field_has_a_variable_and_aliases_add_theirs():
    names = env_names(WorkerConfig)
    assert names["EDGESPLIT_STORE"] == "store" and names["EDGESPLIT_COORDINATOR"] == "coordinator"
    assert names["EDGESPLIT_MEMORY_BUDGET_BYTES"] == names["EDGESPLIT_MEMORY_BUDGET"] == "memory_budget_bytes"
    assert names["EDGESPLIT_STORE_READ_RATE"] == "store_read_bytes"
    assert set(names.values()) == {f for f in WorkerConfig.__dataclass_fields__}
    assert env_names(CoordinatorConfig)["EDGESPLIT_UPLINK_RATE"] == "uplink_bytes"


@pytest.mark.timeout(10)
def test_values_are_typed_like_a_config_file():
    cfg = from_env(WorkerConfig, environ={
        "EDGESPLIT_MEMORY_BUDGET": "1.5GiB", "EDGESPLIT_QUEUE_DEPTH": "3", "EDGESPLIT_BATCH_WAIT_MS": "0.5",
        "EDGESPLIT_INSECURE": "yes", "EDGESPLIT_DEVICE": "cuda", "EDGESPLIT_COORDINATOR": " tcp://10.0.0.1:5555 "})
    assert cfg.memory_budget_bytes == int(1.5 * 2**30) and cfg.queue_depth == 3 and cfg.batch_wait_ms == 0.5
    assert cfg.insecure is True and cfg.device == "cuda" and cfg.coordinator == "tcp://10.0.0.1:5555"
    assert cfg.bind == WorkerConfig().bind  # not set: the default stays


@pytest.mark.timeout(10)
def test_unknown_and_foreign_variables_are_left_alone():
    env = {"EDGESPLIT_FUZZ_N": "10", "EDGESPLIT_HEARTBEAT": "x", "EDGESPLIT_DEVICE": "not-a-coordinator-field",
           "EDGESPLIT_STORE": "/var/lib/edgesplit/store"}
    cfg = from_env(CoordinatorConfig, environ=env)  # DEVICE is a worker's: the coordinator ignores it
    assert cfg.store == "/var/lib/edgesplit/store" and cfg.bind == CoordinatorConfig().bind


@pytest.mark.timeout(10)
@pytest.mark.parametrize("var, value, match", [
    ("EDGESPLIT_QUEUE_DEPTH", "four", r"EDGESPLIT_QUEUE_DEPTH='four'.*queue_depth must be int"),
    ("EDGESPLIT_MEMORY_BUDGET", "lots", r"EDGESPLIT_MEMORY_BUDGET='lots'.*memory_budget_bytes must be int"),
    ("EDGESPLIT_LOG_LEVEL", "loud", r"EDGESPLIT_LOG_LEVEL='loud'.*must be one of"),
    ("EDGESPLIT_INSECURE", "maybe", r"EDGESPLIT_INSECURE='maybe'.*must be bool"),
    ("EDGESPLIT_MAX_BATCH", "2.5", r"EDGESPLIT_MAX_BATCH='2.5'.*must be int"),
    ("EDGESPLIT_QUEUE_DEPTH", " ", r"EDGESPLIT_QUEUE_DEPTH is empty"),
    ("EDGESPLIT_INSECURE", "", r"EDGESPLIT_INSECURE is empty"),
])
def test_a_bad_value_names_its_variable(var, value, match):
    with pytest.raises(ConfigError, match=match):
        from_env(WorkerConfig, environ={var: value})


@pytest.mark.timeout(10)
def test_field_and_alias_together_are_refused():
    with pytest.raises(ConfigError, match="EDGESPLIT_MEMORY_BUDGET_BYTES and EDGESPLIT_MEMORY_BUDGET both set"):
        from_env(WorkerConfig, environ={"EDGESPLIT_MEMORY_BUDGET": "2GiB", "EDGESPLIT_MEMORY_BUDGET_BYTES": "1GiB"})


@pytest.mark.timeout(10)
def test_empty_means_unset_or_empty_text_and_overrides_a_file():
    base = WorkerConfig(name="from-file", keys="/etc/keys")
    cfg = from_env(WorkerConfig, base, environ={"EDGESPLIT_NAME": "", "EDGESPLIT_KEYS": "  "})
    assert cfg.name is None and cfg.keys is None  # a worker without a name takes the host name
    on = CoordinatorConfig(metrics_bind="0.0.0.0:9464")
    assert from_env(CoordinatorConfig, on, environ={"EDGESPLIT_METRICS_BIND": ""}).metrics_bind == ""  # off


@pytest.mark.timeout(10)
def test_a_local_clusters_daemons_ignore_the_inherited_environment():
    env = {CHILD_ENV: "1234", "EDGESPLIT_NAME": "same-for-all", "EDGESPLIT_KEYS": "/home/me/keys"}
    assert from_env(WorkerConfig, environ=env) == WorkerConfig()


@pytest.mark.timeout(30)
def test_cli_precedence_defaults_file_environment_flags(tmp_path, monkeypatch):
    conf = tmp_path / "w.toml"
    conf.write_text(textwrap.dedent("""\
        [worker]
        store = "/from/file"
        device = "cuda"
        queue_depth = 5
        memory_budget_bytes = "1GiB"
    """))
    monkeypatch.setenv("EDGESPLIT_STORE", "/from/env")
    monkeypatch.setenv("EDGESPLIT_QUEUE_DEPTH", "6")
    monkeypatch.setenv("EDGESPLIT_MAX_BATCH", "2")
    monkeypatch.delenv(CHILD_ENV, raising=False)
    parser = cli.build_parser("worker")
    args = parser.parse_args(["worker", "--config", str(conf), "--queue-depth", "7"])
    cfg = cli._build(WorkerConfig, args, "worker")
    assert cfg.device == "cuda" and cfg.memory_budget_bytes == 2**30  # file over defaults
    assert cfg.store == "/from/env" and cfg.max_batch == 2  # environment over file and defaults
    assert cfg.queue_depth == 7  # flags over everything
    assert cfg.bind == WorkerConfig().bind  # set nowhere: the default
    assert load_file(conf, "worker")["store"] == "/from/file"


@pytest.mark.timeout(60)
def test_the_worker_command_reports_a_bad_variable_and_exits():
    """A real ``edgesplit worker`` process: the variable reaches it, and a bad one stops it before it starts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGESPLIT_")}
    env["EDGESPLIT_MEMORY_BUDGET"] = "two gigs"
    out = subprocess.run([sys.executable, "-m", "edgesplit.runtime.cli", "worker"], env=env, capture_output=True,
                         text=True, timeout=50)
    assert out.returncode != 0, out.stderr  # a usage error: the process never got to start a daemon
    assert "environment variable EDGESPLIT_MEMORY_BUDGET='two gigs'" in out.stderr


@pytest.mark.timeout(60)
def test_toml_config_without_tomllib_uses_tomli(tmp_path):
    """Python 3.10 has no tomllib; ``load_file`` falls back to tomli (a dependency there)."""
    probe = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('tomli') else 1)"
    if subprocess.run([sys.executable, "-c", probe]).returncode:
        pytest.skip("tomli is not installed (it is only a dependency on Python < 3.11)")
    conf = tmp_path / "c.toml"
    conf.write_text('[coordinator]\nstore = "/s"\nheartbeat_ms = 250\n')
    code = ("import sys; sys.modules['tomllib'] = None\n"  # what `import tomllib` meets on Python 3.10
            "from edgesplit.runtime.config import load_file\n"
            f"print(load_file({str(conf)!r}, 'coordinator'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "{'store': '/s', 'heartbeat_ms': 250}"


# --- where a bad value came from: the file and its key, or the variable, never a flag not given ----------------
def _coordinator_in(tmp_path, monkeypatch, capsys, argv: list[str], env: dict[str, str]) -> str:
    """``edgesplit coordinator ARGV`` in an empty directory with only ``env`` set: exit 2, one line, nothing made."""
    for var in [v for v in os.environ if v.startswith("EDGESPLIT_")]:
        monkeypatch.delenv(var)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    assert cli.main(["coordinator", *argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert list(work.iterdir()) == []  # no store, blocks, models or plans in the current directory
    return lines[0]


@pytest.mark.timeout(10)
@pytest.mark.parametrize("line, says", [
    ("store = {}", "key 'store': CoordinatorConfig.store must be a string, got {} (a table)"),
    ('store = ["a", "b"]', "key 'store': CoordinatorConfig.store must be a string, got ['a', 'b'] (a list)"),
    ("heartbeat_ms = true", "key 'heartbeat_ms': CoordinatorConfig.heartbeat_ms must be an integer, got True"),
    ("heartbeat_ms = 2.5", "must be an integer, got 2.5 (a number)"),
    ('heartbeat_ms = "250"', "got '250' (a string); write it without quotes"),
    ("bind = 5555", "key 'bind': CoordinatorConfig.bind must be a string, got 5555 (an integer)"),
    ('store = ""', "key 'store': CoordinatorConfig.store cannot be empty"),
    ('bind = "garbage"', "bind = garbage is not an endpoint: it needs the tcp:// scheme"),
    ('metrics_bind = "http://h:9"', "metrics_bind = http://h:9: it takes HOST:PORT"),
])
def test_a_config_files_value_must_have_its_type_and_names_file_and_key(tmp_path, line, says):
    conf = tmp_path / "c.toml"
    conf.write_text(f"[coordinator]\n{line}\n")
    with pytest.raises(ConfigError) as e:
        cli._build(CoordinatorConfig, cli.build_parser("coordinator").parse_args(["coordinator", "--config",
                                                                                  str(conf)]), "coordinator")
    assert str(e.value).startswith(f"config file {conf} [coordinator]: ") and says in str(e.value)
    assert "--" not in str(e.value)  # no flag was given


@pytest.mark.timeout(10)
def test_typed_file_values_that_fit_are_taken(tmp_path):
    conf = tmp_path / "w.json"
    conf.write_text('{"heartbeat_ms": 250.0, "batch_wait_ms": 1, "memory_budget_bytes": "1GiB", "insecure": false,'
                    ' "name": "", "advertise": "tcp://10.0.0.2:5600"}')
    from edgesplit.runtime.config import from_mapping

    cfg = from_mapping(WorkerConfig, load_file(conf, "worker"))
    assert (cfg.heartbeat_ms, cfg.batch_wait_ms, cfg.memory_budget_bytes) == (250, 1.0, 2**30)
    assert cfg.insecure is False and cfg.name is None and cfg.advertise == "tcp://10.0.0.2:5600"


@pytest.mark.timeout(10)
def test_top_level_keys_beside_the_section_table_are_refused(tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text('store = "/s"\nbind = "tcp://*:1"\n[coordinator]\nheartbeat_ms = 250\n')
    with pytest.raises(ConfigError, match=r"top-level keys \['bind', 'store'\] and a \[coordinator\] table"):
        load_file(conf, "coordinator")
    both = tmp_path / "both.toml"  # one file for both daemons: the other table is not this one's business
    both.write_text('[worker]\nstore = "/w"\n[coordinator]\nstore = "/c"\n')
    assert load_file(both, "coordinator") == {"store": "/c"} and load_file(both, "worker") == {"store": "/w"}
    flat = tmp_path / "flat.toml"
    flat.write_text('store = "/s"\n')
    assert load_file(flat, "coordinator") == {"store": "/s"}


@pytest.mark.timeout(20)
@pytest.mark.parametrize("env, says", [
    ({"EDGESPLIT_BIND": "garbage"}, "environment variable EDGESPLIT_BIND=garbage is not an endpoint: it needs the "
                                    "tcp:// scheme, e.g. EDGESPLIT_BIND=tcp://garbage:5555"),
    ({"EDGESPLIT_BIND": "tcp://*"}, "EDGESPLIT_BIND=tcp://* has no port"),
    ({"EDGESPLIT_METRICS_BIND": "9464"}, "EDGESPLIT_METRICS_BIND=9464 is not HOST:PORT"),
    ({"EDGESPLIT_STORE": ""}, "environment variable EDGESPLIT_STORE is empty"),
    ({"EDGESPLIT_BIND": " "}, "environment variable EDGESPLIT_BIND is empty"),
])
def test_a_bad_variable_is_named_not_a_flag_and_nothing_is_created(tmp_path, monkeypatch, capsys, env, says):
    line = _coordinator_in(tmp_path, monkeypatch, capsys, [], env)
    assert line.startswith("edgesplit coordinator: error: ") and says in line and "--" not in line


@pytest.mark.timeout(20)
def test_a_bad_file_endpoint_through_the_cli_names_the_file(tmp_path, monkeypatch, capsys):
    conf = tmp_path / "c.toml"
    conf.write_text('[coordinator]\nbind = "tcp://*:99999"\n')
    line = _coordinator_in(tmp_path, monkeypatch, capsys, ["--config", str(conf)], {})
    assert f"config file {conf} [coordinator]: bind = tcp://*:99999: port '99999'" in line


@pytest.mark.timeout(10)
def test_empty_text_is_refused_unless_empty_is_the_default():
    with pytest.raises(ConfigError, match="EDGESPLIT_COORDINATOR is empty"):
        from_env(WorkerConfig, environ={"EDGESPLIT_COORDINATOR": ""})
    args = cli.build_parser("worker").parse_args(["worker", "--store", ""])
    with pytest.raises(ConfigError, match="WorkerConfig.store cannot be empty"):
        cli._build(WorkerConfig, args, "worker")
