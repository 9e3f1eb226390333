"""Which guest pages are written most? A live top-N of a VM's tracked writes.

Watches a VM with the async client, counts write events per page (gfn), and prints the
most-written pages. Events the stream could not deliver arrive as gap records (the
consumer fell behind, or asked for history the daemon no longer holds): they are
counted and reported, never silently dropped.

    python examples/top_pages.py demo --events 10000 --top 10
    python examples/top_pages.py vm1 --seconds 30 --target 127.0.0.1:50051

Copy it and change ``report`` or the counting to suit.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys

import numpy as np

import pagetrack


class PageCounts:
    """Writes per gfn, and what the stream lost."""

    def __init__(self) -> None:
        self.writes: collections.Counter[int] = collections.Counter()
        self.events = 0
        self.lost = 0
        self.lost_by_reason: collections.Counter[str] = collections.Counter()
        self.gaps = 0

    def add(self, batch: pagetrack.EventBatch) -> None:
        """Count one batch of events (numpy columns: one pass, not one Python step each)."""
        gfns, counts = np.unique(batch.gfn, return_counts=True)
        self.writes.update(dict(zip(gfns.tolist(), counts.tolist(), strict=True)))
        self.events += len(batch)

    def gap(self, gap: pagetrack.Gap) -> None:
        """Count events the stream did not get."""
        self.gaps += 1
        self.lost += gap.count
        self.lost_by_reason[str(gap.reason)] += gap.count


def report(counts: PageCounts, top: int) -> str:
    """The summary: events seen, events lost, and the top pages."""
    lines = [f"events: {counts.events}"]
    if counts.gaps:
        why = ", ".join(f"{r}: {n}" for r, n in counts.lost_by_reason.most_common())
        lines.append(f"lost: {counts.lost} events in {counts.gaps} gaps ({why})")
    else:
        lines.append("lost: 0 events")
    lines.append(f"top {top} pages by writes:")
    for gfn, n in counts.writes.most_common(top):
        share = n / counts.events if counts.events else 0.0
        lines.append(f"  gfn {gfn:#x}  {n:8d}  {share:6.1%}")
    return "\n".join(lines)


async def watch_top(args: argparse.Namespace) -> PageCounts:
    counts = PageCounts()
    async with pagetrack.AsyncClient(args.target, token=args.token) as client:
        stream = client.watch(
            args.vm,
            start_seq=args.start_seq,
            omit_data=True,  # only addresses are counted: do not ship the bytes
            queue_limit=args.queue_limit,
            policy="drop" if args.queue_limit else None,
        )
        try:
            async with asyncio.timeout(args.seconds):
                async for msg in stream:
                    if isinstance(msg, pagetrack.EventBatch):
                        counts.add(msg)
                    elif isinstance(msg, pagetrack.Registered):
                        print(f"watching {msg.vm} from seq {msg.start_seq}", flush=True)
                    elif isinstance(msg, pagetrack.Gap):
                        counts.gap(msg)
                        print(
                            f"gap: lost {msg.count} events, seqs {msg.first_seq}..{msg.last_seq}"
                            f" ({msg.reason})",
                            flush=True,
                        )
                    elif isinstance(msg, pagetrack.Closed):
                        print(f"stream closed: {msg.reason}", flush=True)
                        break
                    if args.events and counts.events + counts.lost >= args.events:
                        break
        except TimeoutError:
            pass  # --seconds is up: report what was seen
        finally:
            await stream.aclose()
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("vm", help="the VM to watch")
    p.add_argument("--target", default="127.0.0.1:50051", help="pagetrackd HOST:PORT or unix:PATH")
    p.add_argument("--token", default=None, help="bearer token, when the daemon wants one")
    p.add_argument("--events", type=int, default=0,
                   help="stop after this many events, seen or lost (0 = no limit)")
    p.add_argument("--seconds", type=float, default=None, help="stop after this long")
    p.add_argument("--top", type=int, default=10, help="how many pages to list")
    p.add_argument("--start-seq", type=int, default=None,
                   help="replay from this seq of the daemon's history (default: from now)")
    p.add_argument("--queue-limit", type=int, default=None,
                   help="drop (and report) events past this many queued, instead of"
                        " slowing the VM")
    args = p.parse_args(argv)
    try:
        counts = asyncio.run(watch_top(args))
    except pagetrack.PageTrackError as exc:
        print(f"top_pages: {exc} ({exc.reason or exc.code})", file=sys.stderr)
        return 1
    print(report(counts, args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
