"""pagetrack.v1 keeps its compatibility promise (docs/compatibility.md): ``buf lint``
passes, and ``buf breaking`` finds nothing against the last released descriptor set."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.node_tools import ROOT, npm_ci

PROTO = ROOT / "proto"
RELEASED = PROTO / "released"


@pytest.fixture(scope="module")
def buf() -> Path:
    """The buf binary from the pinned @bufbuild/buf npm package."""
    return npm_ci(ROOT / "tools" / "buf") / ".bin" / "buf"


def _run(buf: Path, *args: str, cwd: Path = PROTO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(buf), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def _version(path: Path) -> tuple[int, ...]:
    m = re.fullmatch(r"pagetrack-v1-(\d+)\.(\d+)\.(\d+)\.binpb", path.name)
    assert m, f"unexpected file in proto/released: {path.name}"
    return tuple(int(g) for g in m.groups())


def _last_release() -> Path:
    return max(RELEASED.glob("*.binpb"), key=_version)


def test_buf_lint_passes(buf: Path) -> None:
    """buf lint (STANDARD, less the exceptions buf.yaml gives reasons for) passes."""
    result = _run(buf, "lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_breaking_change_since_the_last_release(buf: Path) -> None:
    """buf breaking (FILE rules: no field, value, message or RPC removed, renumbered,
    renamed or retyped) passes against the newest proto/released descriptor set."""
    result = _run(buf, "breaking", "--against", str(_last_release()))
    assert result.returncode == 0, result.stdout + result.stderr


def _copy_proto(tmp_path: Path, edit: tuple[str, str]) -> Path:
    out = tmp_path / "proto"
    shutil.copytree(PROTO, out, ignore=shutil.ignore_patterns("released"))
    path = out / "pagetrack" / "v1" / "pagetrack.proto"
    text = path.read_text()
    assert edit[0] in text
    path.write_text(text.replace(edit[0], edit[1], 1))
    return out


@pytest.mark.parametrize(
    ("edit", "rule"),
    [
        (("DmaPolicy dma_policy = 1;", "DmaPolicy dma_policy = 9;"), "FIELD_NO_DELETE"),
        (("Semantics semantics = 2;", "Semantics move_semantics = 2;"), "FIELD_SAME_NAME"),
        (("CostModel cost = 3;", "reserved 3;"), "FIELD_NO_DELETE"),
        (("CostModel cost = 3;", "VmLimits cost = 3;"), "FIELD_SAME_TYPE"),
    ],
)
def test_buf_breaking_catches_a_broken_promise(
    buf: Path, tmp_path: Path, edit: tuple[str, str], rule: str
) -> None:
    """The check can fail: renumbering, renaming, removing or retyping a field is caught."""
    result = _run(buf, "breaking", "--against", str(_last_release()), "--error-format=json",
                  cwd=_copy_proto(tmp_path, edit))
    assert result.returncode != 0
    found = [json.loads(line)["type"] for line in result.stdout.splitlines()]
    assert rule in found, result.stdout + result.stderr


def test_adding_a_field_keeps_the_promise(buf: Path, tmp_path: Path) -> None:
    """Adding a field (what a minor version may do) passes buf breaking and buf lint."""
    out = _copy_proto(tmp_path, ("VmLimits limits = 4;",
                                 "VmLimits limits = 4;\n  // Added.\n  uint32 added_later = 99;"))
    for args in (("breaking", "--against", str(_last_release())), ("lint",)):
        result = _run(buf, *args, cwd=out)
        assert result.returncode == 0, result.stdout + result.stderr
