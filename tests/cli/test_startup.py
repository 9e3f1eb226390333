"""The ``pagetrack`` command starts without grpc, numpy or the client: --help and argument
errors never load them (what that buys in seconds is bench/cli.py's figure, not a test)."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

HEAVY = ("grpc", "numpy", "google.protobuf", "pagetrack.client", "pagetrack.v1")

PROBE = r"""
import contextlib, io, json, sys
argv = json.loads(sys.argv[1])
if argv is None:
    import pagetrack.cli
    code = 0
else:
    from pagetrack.cli import main
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def _loaded(argv: list[str] | None) -> tuple[int, set[str]]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(argv)],
        capture_output=True, text=True, check=True, timeout=60,
    )
    got = json.loads(done.stdout)
    return got["code"], set(got["modules"])


@pytest.mark.parametrize(
    ("argv", "status"),
    [
        (None, 0),  # import pagetrack.cli
        (["--help"], 0),
        (["vm", "--help"], 0),
        (["watch", "--help"], 0),
        (["vm", "create"], 2),  # a missing argument
        (["write", "vm1", "0x1000"], 2),
        (["--no-such-flag"], 2),
        (["track", "add", "vm1", "zz"], 2),  # a gfn that does not parse
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else str(v),
)
def test_help_and_usage_errors_load_no_grpc_numpy_or_client(
    argv: list[str] | None, status: int
) -> None:
    code, modules = _loaded(argv)
    assert code == status
    heavy = sorted(m for m in modules if m.split(".")[0] in ("grpc", "numpy")
                   or any(m == h or m.startswith(h + ".") for h in HEAVY))
    assert not heavy, heavy


def test_import_pagetrack_is_lazy_but_complete() -> None:
    """``import pagetrack`` loads nothing heavy; every exported name still resolves."""
    code = (
        "import sys, pagetrack\n"
        "assert 'grpc' not in sys.modules and 'numpy' not in sys.modules, 'eager'\n"
        "missing = [n for n in pagetrack.__all__ if getattr(pagetrack, n, None) is None]\n"
        "assert not missing, missing\n"
        "from pagetrack import *  # noqa\n"
        "print(pagetrack.__version__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


def test_one_version_everywhere() -> None:
    """``pagetrack --version``, ``pagetrackd --version`` and the package metadata all give
    pyproject.toml's version (the one place it is written)."""
    root = Path(__file__).resolve().parents[2]
    want = tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]
    bindir = Path(sys.executable).parent
    for cmd in ("pagetrack", "pagetrackd"):
        done = subprocess.run([str(bindir / cmd), "--version"], capture_output=True, text=True,
                              timeout=60, check=True)
        assert done.stdout.strip() == f"{cmd} {want}"
    import pagetrackd

    assert pagetrackd.__version__ == want
