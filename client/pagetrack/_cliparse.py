"""Parsing and formatting helpers of the ``pagetrack`` command: sizes, gfn lists, data,
durations, hexdumps and JSON. Parsers raise ValueError with a message for the user."""

from __future__ import annotations

import dataclasses
import enum
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagetrack.constants import PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from pagetrack.types import GfnRange

_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
    "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
    "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
    "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40,
}
_SIZE = re.compile(r"^\s*(0x[0-9a-f_]+|\d[\d_]*(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$", re.IGNORECASE)


def parse_int(text: str) -> int:
    """A non-negative integer: decimal, 0x hex, 0o octal or 0b binary; ``_`` allowed."""
    try:
        value = int(text.strip(), 0)
    except ValueError:
        raise ValueError(f"{text!r} is not an integer (decimal or 0x hex)") from None
    if value < 0:
        raise ValueError(f"{text!r} must not be negative")
    return value


def parse_size(text: str) -> int:
    """Bytes from ``4096``, ``0x1000``, ``16M``, ``4G``, ``1.5GiB`` (K/M/G/T are powers of 1024)."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a size (examples: 4096, 0x1000, 256M, 4G)")
    number, unit = m.group(1), m.group(2).lower()
    if unit not in _UNITS:
        raise ValueError(f"{text!r}: unknown unit {m.group(2)!r} (use K, M, G or T)")
    if number.lower().startswith("0x"):
        value = int(number, 16) * _UNITS[unit]
    elif "." in number:
        exact = float(number.replace("_", "")) * _UNITS[unit]
        if exact != int(exact):
            raise ValueError(f"{text!r} is not a whole number of bytes")
        value = int(exact)
    else:
        value = int(number.replace("_", "")) * _UNITS[unit]
    return int(value)


def size_to_pages(text: str, what: str) -> int:
    """A byte size that must be a whole number of 4 KiB pages, in pages."""
    size = parse_size(text)
    if size % PAGE_SIZE:
        raise ValueError(f"{what} {text!r} is not a multiple of the 4096-byte page size")
    return size >> PAGE_SHIFT


def parse_duration_ms(text: str) -> int:
    """Milliseconds from ``500ms``, ``10s``, ``2m``, ``1h`` or a plain number of seconds."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a duration (examples: 500ms, 10s, 2m)")
    scale = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, None: 1000}[
        m.group(2).lower() if m.group(2) else None
    ]
    return int(round(float(m.group(1)) * scale))


def parse_gfn_specs(specs: Iterable[str]) -> tuple[list[GfnRange], list[int]]:
    """Ranges and single gfns from ``0x1000-0x1fff`` (inclusive), ``0x1000+16`` (start and
    count), ``42`` and comma lists of those."""
    from pagetrack.types import GfnRange

    ranges: list[GfnRange] = []
    gfns: list[int] = []
    for spec in specs:
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part:
                lo_text, _, hi_text = part.partition("-")
                lo, hi = parse_int(lo_text), parse_int(hi_text)
                if hi < lo:
                    raise ValueError(f"gfn range {part!r} ends before it starts")
                ranges.append(GfnRange(lo, hi - lo + 1))
            elif "+" in part:
                lo_text, _, count_text = part.partition("+")
                lo, count = parse_int(lo_text), parse_int(count_text)
                if count < 1:
                    raise ValueError(f"gfn range {part!r} needs a count of at least 1")
                ranges.append(GfnRange(lo, count))
            else:
                gfns.append(parse_int(part))
    if not ranges and not gfns:
        raise ValueError("name at least one gfn (e.g. 0x1000, 0x1000-0x1fff, 0x1000+16)")
    return ranges, gfns


def parse_data(text: str, *, force_hex: bool = False, force_text: bool = False) -> bytes:
    """Bytes to write, in order: ``0x...`` hex (``0x1122`` is 0x11 then 0x22; any hex with
    --hex), ``@FILE`` for a file's contents, otherwise the UTF-8 text itself."""
    if force_text:
        return text.encode()
    if text.startswith("@") and not force_hex:
        try:
            return Path(text[1:]).read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read {text[1:]}: {exc.strerror}") from None
    if force_hex or text.lower().startswith("0x"):
        digits = text[2:] if text.lower().startswith("0x") else text
        digits = re.sub(r"[\s:_]", "", digits)
        try:
            return bytes.fromhex(digits)
        except ValueError:
            raise ValueError(
                f"{text!r} is not valid hex (an even number of 0-9a-f digits)"
            ) from None
    return text.encode()


def parse_uint_le(text: str, width: int) -> bytes:
    """An unsigned integer (``0x...`` or decimal, ``_`` allowed) as the ``width`` bytes an
    x86 store of that size writes: little-endian, lowest byte first."""
    try:
        value = int(text.replace("_", ""), 0)
    except ValueError:
        raise ValueError(f"{text!r} is not an integer (0x1f, 31)") from None
    if not 0 <= value < 1 << (8 * width):
        raise ValueError(f"{text} does not fit in {width} byte{'s' * (width > 1)}"
                         f" (0 to {(1 << (8 * width)) - 1:#x})")
    return value.to_bytes(width, "little")


def parse_options(items: Iterable[str]) -> dict[str, str]:
    """``key=value`` pairs."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"option {item!r} must look like key=value")
        out[key.strip()] = value.strip()
    return out


def hexdump(data: bytes, base: int = 0) -> str:
    """xxd-style lines: address, 16 hex bytes, printable characters."""
    lines = []
    for off in range(0, len(data), 16):
        chunk = data[off : off + 16]
        hexes = " ".join(chunk[i : i + 2].hex() for i in range(0, len(chunk), 2))
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{base + off:012x}: {hexes:<39}  {text}")
    return "\n".join(lines)


def compress_ranges(values: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted values as inclusive (first, last) runs."""
    out: list[tuple[int, int]] = []
    for v in sorted(values):
        if out and v == out[-1][1] + 1:
            out[-1] = (out[-1][0], v)
        else:
            out.append((v, v))
    return out


def format_runs(runs: list[tuple[int, int]]) -> str:
    """``0x0-0xf, 0x20`` from runs."""
    return ", ".join(f"{a:#x}" if a == b else f"{a:#x}-{b:#x}" for a, b in runs)


def human_bytes(n: float) -> str:
    """``1.5 GiB`` and friends."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def jsonable(value: Any) -> Any:
    """Dataclasses, enums, bytes (as hex) and numpy values as JSON-ready data."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    np = sys.modules.get("numpy")  # (no numpy value exists unless numpy was loaded)
    if np is not None and isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    return value
