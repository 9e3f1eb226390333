"""A user's own script, outside the repository, type-checks against the installed package.

The editable install must be path-based (a .pth naming client/ and server/): an import
hook is invisible to mypy and IDEs, which then report ``pagetrack`` as untyped or missing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

USER_SCRIPT = '''\
"""Count a VM's tracked gfns and print its head seq."""
import asyncio

import pagetrack
from pagetrack import AsyncClient, GfnRange, NotFound, Vm


async def head(target: str, name: str) -> int:
    async with AsyncClient(target, timeout=5.0) as pt:
        try:
            vm: Vm = await pt.get_vm(name)
        except NotFound as exc:
            info: pagetrack.ResourceInfo | None = exc.resource_info
            print(exc.code, exc.reason, exc.message, info.resource_name if info else "")
            return -1
        except pagetrack.ResourceExhausted as exc:
            delay: float | None = exc.retry_delay
            print([v.quota_id for v in exc.quota_violations], delay)
            return -2
        change = await pt.add_tracking(name, ranges=[GfnRange(0x100, 4)])
        print(change.transitions, pagetrack.__name__)
        return vm.head_seq


if __name__ == "__main__":
    print(asyncio.run(head("127.0.0.1:50051", "vm1")))
'''

# The same call with a wrong argument type: passes only if mypy saw no types at all.
BAD_SCRIPT = '''\
import asyncio

from pagetrack import AsyncClient


async def main() -> None:
    async with AsyncClient("127.0.0.1:50051") as pt:
        seq: str = await pt.delete_vm(42)
        print(seq)


asyncio.run(main())
'''


def _mypy(script: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MYPYPATH", "PYTHONPATH")}
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-error-summary", script.name],
        cwd=script.parent, env=env, capture_output=True, text=True, timeout=300,
    )


@pytest.mark.slow
def test_user_script_outside_the_repo_type_checks(tmp_path: Path) -> None:
    """mypy --strict, run from a folder outside the repository with no config, passes on
    a typed user script, and fails on one that passes the wrong types: it resolved
    pagetrack through the installed package, not as an untyped or missing module."""
    assert not tmp_path.resolve().is_relative_to(ROOT)
    good = tmp_path / "user_script.py"
    good.write_text(USER_SCRIPT)
    result = _mypy(good)
    assert result.returncode == 0, result.stdout + result.stderr

    bad = tmp_path / "wrong_types.py"
    bad.write_text(BAD_SCRIPT)
    result = _mypy(bad)
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    assert 'Argument 1 to "delete_vm" of "AsyncClient" has incompatible type "int"' in out, out
    assert 'Incompatible types in assignment (expression has type "int"' in out, out
    assert "import-not-found" not in out and "import-untyped" not in out, out
