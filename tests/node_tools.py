"""npm packages the tests need (buf, the Node.js example's gRPC libraries), installed from
their committed lockfiles with ``npm ci``, as ``make tools`` does.

A missing node/npm or a failed install fails the test loudly: these checks never skip.
"""

from __future__ import annotations

import fcntl
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def npm_ci(folder: Path) -> Path:
    """``npm ci`` in ``folder`` unless its node_modules already matches the lockfile;
    returns ``folder / "node_modules"``. Concurrent callers wait for one install."""
    modules = folder / "node_modules"
    installed = modules / ".package-lock.json"
    lock = folder / "package-lock.json"
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        pytest.fail("node and npm are needed (Debian: apt-get install nodejs npm)")
    with (folder / ".npm-install.lock").open("w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        if installed.exists() and installed.stat().st_mtime >= lock.stat().st_mtime:
            return modules
        result = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=folder, capture_output=True, text=True, timeout=300, check=False,
        )
        if result.returncode != 0:
            pytest.fail(f"npm ci in {folder} failed:\n{result.stdout}\n{result.stderr}")
    return modules
