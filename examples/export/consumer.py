"""Read one VM's exported pagetrack records from NATS JetStream and check them.

    python consumer.py nats://127.0.0.1:4222 'pagetrack.<tenant>.<vm>.>' [--durable NAME]

Prints one line per message (events, gaps, regions) and stops after --until SEQ is
covered, or after --idle seconds without a message. A durable consumer (--durable)
remembers what it acked: run it again and it goes on where it stopped. Needs nats-py and
the pagetrack package (for the EventBatch protobuf class).
"""

from __future__ import annotations

import argparse
import asyncio
import json

import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from pagetrack.v1 import pagetrack_pb2 as pb


async def consume(url: str, subject: str, stream: str, durable: str | None,
                  until: int | None, idle: float) -> int:
    nc = await nats.connect(url)
    js = nc.jetstream()
    sub = await js.pull_subscribe(subject, durable=durable, stream=stream, config=ConsumerConfig(
        deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.EXPLICIT))
    next_seq = None  # the seq after the newest one covered, per the headers
    try:
        while until is None or next_seq is None or next_seq <= until:
            try:
                msgs = await sub.fetch(100, timeout=idle)
            except nats.errors.TimeoutError:
                break
            for msg in msgs:
                h = msg.headers or {}
                kind, vm = h["Pagetrack-Kind"], h["Pagetrack-Vm"]
                first, last = int(h["Pagetrack-First-Seq"]), int(h["Pagetrack-Last-Seq"])
                if kind == "events":
                    if h["Content-Type"].startswith("application/x-protobuf"):
                        seqs = list(pb.EventBatch.FromString(msg.data).seq)
                    else:  # JSON lines
                        seqs = [json.loads(line)["seq"] for line in msg.data.splitlines()]
                    assert seqs == list(range(first, last + 1)), "a batch names its seqs"
                    print(f"{vm} events {first}..{last} ({len(seqs)} events)")
                elif kind == "gaps":
                    print(f"{vm} gap {first}..{last} {h['Pagetrack-Gap-Reason']}"
                          f" ({h['Pagetrack-Count']} events lost)")
                else:
                    print(f"{vm} region removed at seq {h['Pagetrack-At-Seq']}")
                if kind != "regions":
                    if next_seq is not None and first != next_seq:
                        raise SystemExit(f"{vm}: seq {first} follows {next_seq - 1}")
                    next_seq = last + 1
                await msg.ack()
    finally:
        await nc.close()
    return 0 if next_seq is not None else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("subject", help="e.g. pagetrack.<tenant>.<vm>.> or ...events")
    parser.add_argument("--stream", default="PAGETRACK")
    parser.add_argument("--durable", help="durable consumer name (default: ephemeral)")
    parser.add_argument("--until", type=int, help="stop once this seq is covered")
    parser.add_argument("--idle", type=float, default=5.0, help="stop after idle seconds")
    a = parser.parse_args()
    return asyncio.run(consume(a.url, a.subject, a.stream, a.durable, a.until, a.idle))


if __name__ == "__main__":
    raise SystemExit(main())
