"""README.md's examples run as written: each ```sh block in a fresh bash (no venv on PATH,
in the repository root, so ``source .venv/bin/activate`` is what makes ``pagetrack``
found) and each ```python block in a fresh interpreter, against a real daemon of their
own. A block that cannot run here says why in a ``<!-- not run by tests: REASON -->``
line right before it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.daemon_process import start_daemon, with_parent

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv"
README = ROOT / "README.md"
#: the address the README's examples use: the default daemon's
README_TARGET = "127.0.0.1:50051"
SKIP = re.compile(r"<!-- not run by tests: (.+?) -->")


@dataclass(frozen=True)
class Block:
    """A fenced code block of the README."""

    line: int  #: 1-based line of its opening fence
    lang: str
    code: str
    skip: str  #: why it is not run ("" = it is run)


def blocks(text: str) -> list[Block]:
    out: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        prev = lines[i - 1] if i else ""
        skip = SKIP.search(prev)
        out.append(Block(i + 1, m.group(1), "\n".join(lines[i + 1:end]) + "\n",
                         skip.group(1) if skip else ""))
        i = end + 1
    return out


ALL = blocks(README.read_text())
RUN = [b for b in ALL if b.lang in ("sh", "python") and not b.skip]


def test_the_readme_has_runnable_examples() -> None:
    """The shell and Python examples are found, and every block left out says why."""
    assert sum(b.lang == "sh" for b in RUN) >= 1 and sum(b.lang == "python" for b in RUN) >= 2
    assert all(b.lang in ("sh", "python", "text", "toml", "yaml", "json") for b in ALL), [
        (b.line, b.lang) for b in ALL]


def _fresh_env(target: str, home: Path) -> dict[str, str]:
    """A new login's environment: no venv active, PAGETRACK_TARGET naming the test's
    daemon (the README's commands use the default target, 127.0.0.1:50051)."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "PAGETRACK_TARGET": target,
    }


@pytest.mark.skipif(not (VENV / "bin" / "pagetrack").exists(),
                    reason="the README's commands need .venv, which `make` creates")
@pytest.mark.parametrize("block", RUN, ids=lambda b: f"README.md:{b.line}-{b.lang}")
def test_readme_block_runs(block: Block, tmp_path: Path) -> None:
    d = start_daemon(tmp_path)
    try:
        env = _fresh_env(d.tcp, tmp_path)
        if block.lang == "sh":
            cmd = ["bash", "-c", "set -euo pipefail\n" + block.code]
        else:
            code = block.code.replace(f'"{README_TARGET}"', f'"{d.tcp}"')
            cmd = [str(VENV / "bin" / "python"), "-c", code]
        proc = subprocess.Popen(with_parent(cmd), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=90)
        finally:
            # anything the block left running in the background goes too
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if proc.poll() is None:
                proc.communicate()
        assert proc.returncode == 0, (
            f"README.md line {block.line}: the {block.lang} block failed (if it cannot run"
            f" in the tests, put '<!-- not run by tests: WHY -->' before it)\n"
            f"stdout:\n{out}\nstderr:\n{err}"
        )
        assert "Traceback" not in err
    finally:
        assert d.stop() == 0
