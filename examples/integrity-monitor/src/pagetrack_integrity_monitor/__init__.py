"""An integrity monitor for pagetrackd: watch a guest's kernel text and IDT for writes.

Attach with one option, ``ranges``: comma-separated ``[LABEL=]START[+COUNT]`` gfn ranges,
numbers in decimal or 0x-hex, e.g. ``ktext=0x1000+512,idt=0x1800``. The plugin tracks
every gfn of the ranges under its own owner (so the guest's writes there trap), and
publishes a finding of kind ``integrity.write`` for every write that lands in them.
"""

from __future__ import annotations

from collections.abc import Mapping

from pagetrackd.domain import InvalidArgument
from pagetrackd.plugins.api import BasePlugin, Handle, OptionValue, Status, WritePiece

#: most gfns one monitor watches
MAX_PAGES = 1 << 16


def parse_ranges(text: str) -> list[tuple[str, int, int]]:
    """``[LABEL=]START[+COUNT],...`` as (label, first gfn, count) triples."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        label, _, spec = part.rpartition("=")
        start, _, count = spec.partition("+")
        try:
            first, n = int(start, 0), int(count, 0) if count else 1
        except ValueError:
            raise InvalidArgument(f"ranges: {part!r} is not [LABEL=]START[+COUNT]") from None
        if first < 0 or n < 1:
            raise InvalidArgument(f"ranges: {part!r} needs START >= 0 and COUNT >= 1")
        out.append((label or spec, first, n))
    if not out or sum(n for _, _, n in out) > MAX_PAGES:
        raise InvalidArgument(f"ranges: give 1..{MAX_PAGES} gfns")
    return out


class IntegrityMonitor(BasePlugin):
    """Publishes ``integrity.write`` for every write into the watched ranges."""

    def attach(self, handle: Handle, options: Mapping[str, OptionValue]) -> None:
        """Parse ``ranges`` and track every gfn in them under this plugin's owner."""
        unknown = set(options) - {"ranges"}
        if unknown or "ranges" not in options:
            raise InvalidArgument("integrity-monitor takes one option: ranges")
        self.handle = handle
        self.ranges = parse_ranges(str(options["ranges"]))
        self.writes = 0
        for _, first, n in self.ranges:  # all or none: the host releases on a refusal
            handle.track(first, n)

    def on_write(self, piece: WritePiece) -> None:
        """A write into a watched range is a finding."""
        for label, first, n in self.ranges:
            if first <= piece.gfn < first + n:
                self.writes += 1
                self.handle.publish(
                    "integrity.write", piece.gfn, 1,
                    f"{len(piece.data)} byte(s) written into {label} at gpa {piece.gpa:#x}",
                    {"range": label, "gpa": hex(piece.gpa), "vcpu": str(piece.vcpu),
                     "bytes": piece.data[:16].hex(), "dma": str(piece.dma).lower()},
                )
                return

    def status(self) -> Status:
        """Writes seen, and the ranges watched."""
        ranges = ",".join(f"{lb}={f:#x}+{n}" for lb, f, n in self.ranges)
        return Status(counters={"writes": self.writes}, info={"ranges": ranges})
