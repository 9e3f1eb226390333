"""The committed pagetrack.v1 modules match the proto, and columnar batches round-trip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from pagetrack.v1 import pagetrack_pb2 as pb
from pagetrack.v1 import pagetrack_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_up_to_date() -> None:
    """proto/generate.py --check finds client/pagetrack/v1 identical to a fresh generation."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "proto" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, (
        "generated code is stale: run `python proto/generate.py` and commit the result\n"
        + result.stderr
    )


def test_event_batch_round_trips_as_numpy_columns() -> None:
    """A columnar EventBatch built from numpy arrays parses back to the same arrays and bytes."""
    rng = np.random.default_rng(7)
    n = 300
    seq = np.arange(1000, 1000 + n, dtype=np.uint64)
    gpa = (rng.integers(0, 1 << 30, n, dtype=np.uint64) << np.uint64(12)) + np.uint64(8)
    length = rng.integers(1, 65, n, dtype=np.uint32)
    vcpu = rng.integers(0, 8, n, dtype=np.uint32)
    flags = np.where(rng.random(n) < 0.2, pb.EVENT_FLAG_SOURCE_DMA, pb.EVENT_FLAG_NONE)
    flags = flags.astype(np.uint32) | np.uint32(pb.TRACK_MODE_WRITE << 8)
    stamps = np.arange(n, dtype=np.uint64) * np.uint64(1000) + np.uint64(1_700_000_000 * 10**9)
    data = rng.integers(0, 256, int(length.sum()), dtype=np.uint8).tobytes()

    batch = pb.EventBatch(
        seq=seq.tolist(),
        gpa=gpa.tolist(),
        length=length.tolist(),
        vcpu=vcpu.tolist(),
        flags=flags.tolist(),
        timestamp_ns=stamps.tolist(),
        data=data,
        head_seq=int(seq[-1]) + 5,
    )
    wire = pb.WatchResponse(events=batch).SerializeToString()

    parsed = pb.WatchResponse.FromString(wire)
    assert parsed.WhichOneof("kind") == "events"
    got = parsed.events
    np.testing.assert_array_equal(np.array(got.seq, dtype=np.uint64), seq)
    np.testing.assert_array_equal(np.array(got.gpa, dtype=np.uint64), gpa)
    np.testing.assert_array_equal(np.array(got.length, dtype=np.uint32), length)
    np.testing.assert_array_equal(np.array(got.vcpu, dtype=np.uint32), vcpu)
    np.testing.assert_array_equal(np.array(got.flags, dtype=np.uint32), flags)
    np.testing.assert_array_equal(np.array(got.timestamp_ns, dtype=np.uint64), stamps)
    assert got.head_seq == int(seq[-1]) + 5

    # Event i's bytes are data[offsets[i]:offsets[i + 1]].
    offsets = np.concatenate(([0], np.cumsum(np.array(got.length, dtype=np.int64))))
    assert offsets[-1] == len(got.data)
    i = 17
    assert got.data[offsets[i] : offsets[i + 1]] == data[offsets[i] : offsets[i + 1]]
    modes = (np.array(got.flags, dtype=np.uint32) & pb.EVENT_FLAG_MODE_MASK) >> 8
    assert set(modes.tolist()) == {pb.TRACK_MODE_WRITE}


def test_event_batch_columns_are_packed_on_the_wire() -> None:
    """Repeated scalar columns use the packed encoding: one tag and length per column;
    seq, gpa and timestamp_ns are fixed64, so their payload is a little-endian array."""
    wire = pb.EventBatch(seq=[1, 2, 3]).SerializeToString()
    assert wire == bytes([0x0A, 24]) + np.array([1, 2, 3], dtype="<u8").tobytes()
    wire = pb.EventBatch(length=[1, 2, 3]).SerializeToString()
    assert wire == bytes([0x1A, 0x03, 0x01, 0x02, 0x03])


def test_every_service_has_a_stub_and_a_servicer() -> None:
    """Each service in the proto is generated with a stub, a servicer and an add_* helper."""
    services = pb.DESCRIPTOR.services_by_name
    assert set(services) == {
        "VmService",
        "MemoryService",
        "TrackingService",
        "LeaseService",
        "WatchService",
        "PluginService",
        "WorkloadService",
        "AdminService",
    }
    for name in services:
        assert hasattr(pb_grpc, f"{name}Stub")
        assert hasattr(pb_grpc, f"{name}Servicer")
        assert hasattr(pb_grpc, f"add_{name}Servicer_to_server")
    watch = services["WatchService"].methods_by_name["Watch"]
    assert watch.server_streaming and not watch.client_streaming
