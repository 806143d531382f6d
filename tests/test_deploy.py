"""Deployment files only use flags the CLI really has, and the manifests parse."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def _help(command: str) -> str:
    return subprocess.run([sys.executable, "-m", "edgesplit.runtime", command, "--help"], capture_output=True,
                          text=True, timeout=60, check=True).stdout


def _flags(text: str) -> set[str]:
    return set(re.findall(r"(--[a-z][a-z0-9-]+)", text))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", ["worker", "coordinator"])
def test_deploy_files_use_real_flags(command):
    known = _flags(_help(command))
    used: set[str] = set()
    for unit in (DEPLOY / "systemd").glob(f"edgesplit-{command}.service"):
        exec_line = next(line for line in unit.read_text().splitlines() if line.startswith("ExecStart="))
        assert f"edgesplit {command}" in exec_line
        used |= _flags(exec_line)
    for doc in yaml.safe_load_all((DEPLOY / "k3s" / "edgesplit.yaml").read_text()):
        for c in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            if c["command"][:2] == ["edgesplit", command]:
                used |= _flags(" ".join(c["args"]))
    if command == "worker":
        cmd = re.search(r"^CMD (\[.*\])$", (DEPLOY / "jetson" / "Dockerfile").read_text(), re.M).group(1)
        used |= _flags(cmd)
    assert used, f"no deploy file runs `edgesplit {command}`"
    assert used <= known, f"deploy files use flags `edgesplit {command}` lacks: {sorted(used - known)}"


def test_k3s_manifest_parses_to_expected_kinds():
    kinds = [d["kind"] for d in yaml.safe_load_all((DEPLOY / "k3s" / "edgesplit.yaml").read_text())]
    assert kinds == ["Namespace", "Deployment", "Service", "DaemonSet"]
