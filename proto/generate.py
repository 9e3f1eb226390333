"""Generate the pagetrack.v1 Python modules from proto/ into client/pagetrack/v1/.

This script is the only way the generated code is made. It runs grpc_tools.protoc with
the protobuf, grpc, mypy and mypy-grpc plugins into a temporary directory, rewrites the
imports between generated modules to absolute `pagetrack.v1.*` imports, and replaces the
generated files in client/pagetrack/v1/. With `--check` it writes nothing and exits 1 if
the committed files differ from a fresh generation (the staleness test runs this).

Usage: python proto/generate.py [--check]
"""

from __future__ import annotations

import argparse
import difflib
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT_PACKAGE = "pagetrack.v1"
OUT_DIR = ROOT / "client" / "pagetrack" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
INIT_TEXT = '"""Generated pagetrack.v1 protobuf and gRPC modules; made by proto/generate.py."""\n'

# Text that only records the version of the tool that generated a file. --check ignores
# it, so a newer grpcio-tools in a fresh venv does not make unchanged code "stale".
_VERSION_STAMPS = (
    re.compile(r"^# Protobuf Python Version: .*$", re.MULTILINE),
    re.compile(r"^_runtime_version\.ValidateProtobufRuntimeVersion\(.*?\n\)$", re.M | re.S),
    re.compile(r"^GRPC_GENERATED_VERSION = .*$", re.MULTILINE),
)


def _proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "pagetrack").rglob("*.proto"))


def _plugin(name: str) -> str:
    """Finds a protoc plugin script next to the running interpreter, then on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found: install the dev extra (pip install -e '.[dev]')")
    return found


def _run_protoc(out: Path) -> None:
    from grpc_tools import protoc  # dev-only dependency; imported late for a clear error

    include = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--proto_path={include}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *(str(p.relative_to(PROTO_ROOT)) for p in _proto_files()),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see the messages above")


def _fix_imports(text: str, modules: set[str]) -> str:
    """Makes every import of a sibling generated module absolute: `pagetrack.v1.<name>`.

    protoc writes `from pagetrack.v1 import x_pb2` for files under proto/pagetrack/v1/, but
    a bare `import x_pb2` or a `from . import x_pb2` can appear for other layouts; all
    three end up as `from pagetrack.v1 import x_pb2`.
    """
    for name in sorted(modules):
        text = re.sub(
            rf"^(\s*)import {name}\b",
            rf"\1from {OUT_PACKAGE} import {name}",
            text,
            flags=re.MULTILINE,
        )
        text = re.sub(
            rf"^(\s*)from (?:\.|[\w.]+) import {name}\b",
            rf"\1from {OUT_PACKAGE} import {name}",
            text,
            flags=re.MULTILINE,
        )
    return text


def generate() -> dict[str, str]:
    """Returns the generated files as {file name: text}, imports fixed, plus __init__.py."""
    with tempfile.TemporaryDirectory(prefix="pagetrack-proto-") as tmp:
        out = Path(tmp)
        _run_protoc(out)
        produced = [
            p for p in out.rglob("*") if p.is_file() and p.name.endswith(GENERATED_SUFFIXES)
        ]
        modules = {p.name.split(".")[0] for p in produced}
        files = {p.name: _fix_imports(p.read_text(encoding="utf-8"), modules) for p in produced}
    if len(files) != len(produced):
        raise SystemExit("two proto files generate modules with the same name")
    files["__init__.py"] = INIT_TEXT
    return files


def _normalised(text: str) -> list[str]:
    for stamp in _VERSION_STAMPS:
        text = stamp.sub("", text)
    return text.splitlines()


def _stale(files: dict[str, str]) -> list[str]:
    """Lists differences between freshly generated files and those in OUT_DIR."""
    problems: list[str] = []
    present = {p.name for p in OUT_DIR.glob("*") if p.name.endswith(GENERATED_SUFFIXES)}
    for name in sorted(present - files.keys()):
        problems.append(f"{name}: committed but no longer generated")
    for name, text in sorted(files.items()):
        path = OUT_DIR / name
        if not path.exists():
            problems.append(f"{name}: missing")
            continue
        old, new = _normalised(path.read_text(encoding="utf-8")), _normalised(text)
        if old != new:
            diff = difflib.unified_diff(
                old, new, f"committed/{name}", f"generated/{name}", n=1, lineterm=""
            )
            problems.append("\n".join(list(diff)[:40]))
    return problems


def _write(files: dict[str, str]) -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for old in OUT_DIR.glob("*"):
        if old.name.endswith(GENERATED_SUFFIXES) and old.name not in files:
            old.unlink()
    for name, text in files.items():
        (OUT_DIR / name).write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if client/pagetrack/v1 differs from a fresh generation",
    )
    args = parser.parse_args(argv)
    files = generate()
    if args.check:
        problems = _stale(files)
        if problems:
            print("generated code is stale; run: python proto/generate.py", file=sys.stderr)
            print("\n".join(problems), file=sys.stderr)
            return 1
        print(f"{OUT_DIR.relative_to(ROOT)} is up to date ({len(files)} files)")
        return 0
    _write(files)
    print(f"wrote {len(files)} files to {OUT_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
