"""Safe defaults: no shell is ever started from evomerge's code, and the private local Ray
instance a study starts serves no dashboard or client port and refuses a stranger's token."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

import evomerge
from evomerge.cluster.connect import ensure_ray
from evomerge.study.config import parse_study_config

PACKAGE = Path(evomerge.__file__).parent
SHELL_CALLS = {"system", "popen", "Popen", "run", "call", "check_call", "check_output"}


def test_the_package_never_starts_a_shell_or_a_subprocess():
    """Nothing a user writes (paths, names, recipes) can reach a shell: there is no shell."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names]
                module = getattr(node, "module", None) or ""
                if "subprocess" in names or module == "subprocess":
                    found.append(f"{path.name}:{node.lineno} imports subprocess")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = node.func.value
                if (
                    isinstance(owner, ast.Name)
                    and owner.id in ("os", "subprocess")
                    and node.func.attr in SHELL_CALLS
                ):
                    found.append(f"{path.name}:{node.lineno} calls {owner.id}.{node.func.attr}")
            if isinstance(node, ast.keyword) and node.arg == "shell":
                found.append(f"{path.name}:{node.value.lineno} passes shell=")
    assert found == []


@pytest.mark.timeout(300)
def test_the_local_ray_instance_has_no_dashboard_or_client_port_and_wants_its_token(toy_zoo):
    import ray

    config = parse_study_config(
        {
            "name": "toy",
            "base": str(toy_zoo["base"]),
            "sources": [str(toy_zoo["ft_a"]), str(toy_zoo["ft_b"])],
            "space": "task_arithmetic_global",
            "objectives": [{"metric": "toy_facts_a/acc"}],
            "evaluators": [{"kind": "lm_eval", "tasks": ["toy_facts_a"]}],
            "budget": 1,
            "cluster": {"workers": 1},
        },
        "study",
    )
    assert not ray.is_initialized()
    assert ensure_ray(config.cluster)  # the instance `evomerge search` starts when given no address
    try:
        gcs = ray.get_runtime_context().gcs_address
        ours = {p.pid for p in psutil.Process().children(recursive=True)}
        ports = {
            c.laddr.port
            for c in psutil.net_connections("inet")
            if c.status == psutil.CONN_LISTEN and c.pid in ours
        }
        assert ports, "found none of the instance's sockets: the check would prove nothing"
        assert 8265 not in ports and 10001 not in ports  # dashboard UI, Ray client server

        stranger = subprocess.run(
            [sys.executable, "-c", f"import ray; ray.init(address={gcs!r})"],
            env=dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 32),
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert stranger.returncode != 0  # a wrong token cannot join and run code
        assert "Failed to connect" in stranger.stderr or "uthentica" in stranger.stderr
    finally:
        ray.shutdown()
