"""A VM's write events as an Apache Arrow table (and a pandas DataFrame from there).

The Watch stream already sends events as columns (packed arrays of seq, gpa, length,
vcpu, flags, timestamps, and one buffer of data), so each batch becomes an Arrow record
batch without a Python loop: numpy arrays are wrapped, and the data buffer with the
event offsets becomes a binary column as it is. Lost events (gap records) are listed
beside the table, with their seq ranges.

    python examples/to_arrow.py vm1 --events 100000 --out events.arrow
    python -c "import pyarrow as pa; print(pa.ipc.open_file('events.arrow').read_all())"

With pandas installed, ``table.to_pandas()`` gives a DataFrame. Needs pyarrow
(``pip install 'pagetrack[examples]'``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import pagetrack

SCHEMA = pa.schema([
    ("seq", pa.uint64()),
    ("gpa", pa.uint64()),
    ("gfn", pa.uint64()),
    ("length", pa.uint32()),
    ("vcpu", pa.uint32()),  # null for DMA writes
    ("dma", pa.bool_()),
    ("timestamp", pa.timestamp("ns", tz="UTC")),
    ("data", pa.large_binary()),  # empty when the stream omitted data
])


def to_record_batch(batch: pagetrack.EventBatch) -> pa.RecordBatch:
    """One stream batch as one Arrow record batch (columns wrapped, not copied per event)."""
    dma = batch.is_dma
    offsets = batch.offsets  # int64, len + 1 entries
    data = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(batch), [None, pa.py_buffer(offsets), pa.py_buffer(batch.data)]
    )
    return pa.record_batch(
        [
            pa.array(batch.seq),
            pa.array(batch.gpa),
            pa.array(batch.gfn),
            pa.array(batch.length),
            pa.array(batch.vcpu, mask=dma),
            pa.array(dma),
            pa.array(batch.timestamp_ns.astype(np.int64), pa.int64()).cast(SCHEMA.field(6).type),
            data,
        ],
        schema=SCHEMA,
    )


async def collect(args: argparse.Namespace) -> tuple[pa.Table, list[pagetrack.Gap]]:
    """Read the VM's stream until ``--events`` events (seen or lost) or ``--seconds``."""
    batches: list[pa.RecordBatch] = []
    gaps: list[pagetrack.Gap] = []
    seen = lost = 0
    async with pagetrack.AsyncClient(args.target, token=args.token) as client:
        stream = client.watch(args.vm, start_seq=args.start_seq, omit_data=args.omit_data)
        try:
            async with asyncio.timeout(args.seconds):
                async for msg in stream:
                    if isinstance(msg, pagetrack.EventBatch):
                        batches.append(to_record_batch(msg))
                        seen += len(msg)
                    elif isinstance(msg, pagetrack.Gap):
                        gaps.append(msg)
                        lost += msg.count
                    elif isinstance(msg, pagetrack.Closed):
                        break
                    if args.events and seen + lost >= args.events:
                        break
        except TimeoutError:
            pass
        finally:
            await stream.aclose()
    return pa.Table.from_batches(batches, schema=SCHEMA), gaps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("vm", help="the VM to watch")
    p.add_argument("--target", default="127.0.0.1:50051", help="pagetrackd HOST:PORT or unix:PATH")
    p.add_argument("--token", default=None, help="bearer token, when the daemon wants one")
    p.add_argument("--events", type=int, default=0,
                   help="stop after this many events, seen or lost (0 = no limit)")
    p.add_argument("--seconds", type=float, default=None, help="stop after this long")
    p.add_argument("--start-seq", type=int, default=None,
                   help="replay from this seq of the daemon's history (default: from now)")
    p.add_argument("--omit-data", action="store_true", help="addresses only, no bytes")
    p.add_argument("--out", type=Path, default=None,
                   help="write the table to this Arrow IPC file (.arrow)")
    args = p.parse_args(argv)
    try:
        table, gaps = asyncio.run(collect(args))
    except pagetrack.PageTrackError as exc:
        print(f"to_arrow: {exc} ({exc.reason or exc.code})", file=sys.stderr)
        return 1
    print(f"rows: {table.num_rows}")
    print(f"lost: {sum(g.count for g in gaps)} events in {len(gaps)} gaps")
    for g in gaps:
        print(f"  gap seqs {g.first_seq}..{g.last_seq}: {g.count} ({g.reason})")
    if table.num_rows:
        print(f"seqs: {pc.min(table['seq'])}..{pc.max(table['seq'])}")
        print(f"bytes written: {pc.sum(table['length'])}")
        print(f"distinct pages: {pc.count_distinct(table['gfn'])}")
    if args.out is not None:
        with pa.OSFile(str(args.out), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as writer:
            writer.write_table(table)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
