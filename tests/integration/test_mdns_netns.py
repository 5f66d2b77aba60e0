"""mDNS discovery, tested only inside a network namespace this test creates (``unshare -n``, lo up):
the multicast never leaves it. Skipped where namespaces cannot be made (not root, no unshare)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
CHILD = Path(__file__).with_name("mdns_child.py")


def _netns_available() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _netns_available(), reason="needs root and unshare to make a private network namespace")
def test_three_peers_find_each_other_by_mdns_in_a_private_namespace(tmp_path: Path) -> None:
    script = f'ip link set lo up && exec "{sys.executable}" "{CHILD}" "{tmp_path}"'
    env = dict(os.environ, PYTHONPATH=str(CHILD.parents[2]))
    out = subprocess.run(["unshare", "-n", "sh", "-c", script], capture_output=True, text=True, timeout=120, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no result; stderr: {out.stderr[-2000:]}"
    result = json.loads(lines[-1])
    assert result["ok"], result
    print(f"mDNS: 3 peers converged {result['seconds']}s after start")
