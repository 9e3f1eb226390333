"""Physical reference for trap-and-emulate write tracking in user space.

Builds and runs ``bench/baseline/c_trap.c``: a C program that write-protects anonymous pages with
``mprotect(PROT_READ)`` and tracks every 8-byte store through a SIGSEGV handler (one trap plus two
``mprotect`` calls per write). Its throughput is the floor cost of mprotect-based user-space write
tracking on this machine, against which the daemon's numbers are compared.

Importing this module has no side effects; the binary is compiled on first use, and again only
when ``c_trap.c`` is newer than it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BASELINE_DIR = Path(__file__).resolve().parent / "baseline"
SOURCE = BASELINE_DIR / "c_trap.c"
BINARY = BASELINE_DIR / "c_trap"  # gitignored

_RESULT_KEY = "c_trap_writes_per_s"
_COMPILE_TIMEOUT_S = 120.0


def _compiler() -> str:
    cc = shutil.which("cc")
    if cc is None:
        raise RuntimeError(
            "c_trap baseline needs a C compiler: `cc` was not found on PATH "
            "(install gcc or clang, e.g. `apt-get install gcc`)"
        )
    return cc


def _binary_path() -> Path:
    """``bench/baseline/c_trap`` if that directory is writable, else a per-user temp dir."""
    if os.access(BASELINE_DIR, os.W_OK):
        return BINARY
    fallback = Path(tempfile.gettempdir()) / f"pagetrack-c_trap-{os.getuid()}"
    fallback.mkdir(mode=0o700, exist_ok=True)
    return fallback / "c_trap"


def _up_to_date(binary: Path) -> bool:
    try:
        fresh = binary.stat().st_mtime >= SOURCE.stat().st_mtime
    except FileNotFoundError:
        return False
    return fresh and os.access(binary, os.X_OK)


def build_c_trap() -> Path:
    """Compile ``c_trap.c`` with ``cc -O2`` unless the binary is present and up to date."""
    if not SOURCE.is_file():
        raise RuntimeError(f"c_trap baseline source is missing: {SOURCE}")
    binary = _binary_path()
    if _up_to_date(binary):
        return binary
    cc = _compiler()
    # Compile to a private temp name and rename into place, so concurrent callers never run a
    # half-written binary.
    fd, tmp_name = tempfile.mkstemp(prefix=".c_trap-", dir=binary.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            proc = subprocess.run(
                [cc, "-O2", "-o", str(tmp), str(SOURCE)],
                capture_output=True,
                text=True,
                timeout=_COMPILE_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"compiling {SOURCE} timed out after {exc.timeout:.0f}s") from exc
        if proc.returncode != 0:
            raise RuntimeError(
                f"compiling {SOURCE} failed (cc exit {proc.returncode}):\n{proc.stderr.strip()}"
            )
        tmp.chmod(0o755)
        tmp.replace(binary)
    finally:
        tmp.unlink(missing_ok=True)
    return binary


def run_c_trap(writes: int = 1_000_000) -> dict[str, float]:
    """Run the baseline for ``writes`` trapped writes; return its ``name: value`` lines."""
    if writes <= 0:
        raise ValueError(f"writes must be positive, got {writes}")
    binary = build_c_trap()
    try:
        proc = subprocess.run(
            [str(binary), "-n", str(writes)],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError as exc:
        raise RuntimeError(f"could not run {binary}: {exc}") from exc
    if proc.returncode != 0:
        detail = proc.stderr.strip() or proc.stdout.strip() or "no output"
        raise RuntimeError(f"{binary} failed (exit {proc.returncode}): {detail}")
    results: dict[str, float] = {}
    for line in proc.stdout.splitlines():
        name, sep, value = line.partition(":")
        if not sep:
            continue
        try:
            results[name.strip()] = float(value)
        except ValueError:
            continue
    if _RESULT_KEY not in results:
        raise RuntimeError(f"{binary} printed no `{_RESULT_KEY}:` line; output:\n{proc.stdout}")
    return results


def c_trap_writes_per_s(writes: int = 1_000_000) -> float:
    """Writes per second of mprotect + SIGSEGV trap-and-emulate write tracking in C."""
    return run_c_trap(writes)[_RESULT_KEY]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    writes = int(args[0]) if args else 1_000_000
    for name, value in run_c_trap(writes).items():
        print(f"{name}: {int(value) if value.is_integer() else value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
