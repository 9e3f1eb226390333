"""Uploads are checked as they arrive and every size they declare is capped before
anything is allocated for it: RestoreVm looks at the header on the first message,
refuses compressed arrays, and bounds what a snapshot decodes to; recordings stop at
recording_bytes."""

from __future__ import annotations

import hashlib
import io
import json
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from pagetrack.v1 import pagetrack_pb2 as pb
from pagetrackd.state import decode, encode
from tests.robustness.starve_support import ATTACKER, MiB, Tenant, daemon, refused


async def _snapshot(att: Tenant, vm: str) -> bytes:
    out = b""
    async for chunk in att.api.admin.SnapshotVm(
        pb.SnapshotVmRequest(vm=vm, include_memory=True), metadata=att.md
    ):
        out += chunk.data
    return out


async def _restore(att: Tenant, name: str, chunks: Iterable[bytes], *, finish: bool = True
                   ) -> Any:
    """RestoreVm of ``chunks`` as ``name``, one message each; with ``finish`` false the
    stream is left open (the daemon must answer on what it got so far). The reply, or
    raises the daemon's error."""
    call = att.api.admin.RestoreVm(metadata=att.md, timeout=60)
    for i, data in enumerate(chunks):
        await call.write(pb.RestoreVmRequest(vm="" if i else name, data=data))
    if finish:
        await call.done_writing()
    return await call


async def test_an_upload_that_is_not_a_snapshot_is_refused_on_its_first_message(
    tmp_path: Path,
) -> None:
    """Today's code buffered the whole stream before looking at the magic bytes (a
    1.25 GiB upload took 2.7 GiB). Now the first message is enough to refuse it."""
    with daemon(tmp_path) as d:
        att = Tenant(d.tcp, ATTACKER)
        rss0 = d.rss_bytes()
        # One message of 1 MiB, and the stream left open: the daemon answers on it
        # (today's code waited for the rest; a client would have sent all of it).
        try:
            await _restore(att, "junk", [b"\x00NOTSNAP" * (MiB // 8)], finish=False)
            raise AssertionError("garbage was restored")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc
            assert "magic" in (exc.details() or "")
        assert d.rss_bytes() - rss0 < 64 * MiB
        await att.close()


async def test_a_snapshot_declaring_more_than_upload_bytes_is_refused_at_once(
    tmp_path: Path,
) -> None:
    with daemon(tmp_path, f"[tenant_quotas.attacker]\nupload_bytes = {8 * MiB}\n") as d:
        att = Tenant(d.tcp, ATTACKER)
        head = b"{}"
        prefix = struct.pack("<8sII", b"PTVMSNAP", 1, len(head)) + head + struct.pack("<Q", 1 << 40)

        # Only the first bytes are sent: they are enough to refuse the upload.
        await refused(_restore(att, "huge", [prefix], finish=False), "upload_bytes")
        await att.close()


async def test_a_compressed_array_in_a_snapshot_is_refused(tmp_path: Path) -> None:
    """A snapshot of ~0.3 MiB holding a deflated array of 256 MiB of zeros: today's code
    inflated it and succeeded; now compressed members are refused before decoding."""
    with daemon(tmp_path) as d:
        att = Tenant(d.tcp, ATTACKER)
        vm = await att.new_vm(64)
        header, arrays = decode(await _snapshot(att, vm))
        arrays["bomb"] = np.zeros(256 * MiB, dtype=np.uint8)
        head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        out = io.BytesIO()
        np.savez_compressed(out, allow_pickle=False, **arrays)
        del arrays
        payload = out.getvalue()
        body = b"".join((struct.pack("<8sII", b"PTVMSNAP", 1, len(head)), head,
                         struct.pack("<Q", len(payload)), payload))
        bomb = body + hashlib.sha256(body).digest()
        assert len(bomb) < MiB
        rss0 = d.rss_bytes()

        try:
            await _restore(att, "bomb", [bomb])
            raise AssertionError("the compressed snapshot was restored")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc
            assert "compressed" in (exc.details() or "")
        assert d.rss_bytes() - rss0 < 64 * MiB
        await att.close()


async def test_what_a_snapshot_decodes_to_is_capped_by_the_quotas(tmp_path: Path) -> None:
    """The memory a snapshot's pages would take is checked against guest_memory_bytes
    before they are loaded: 40,000 scattered written pages are ~0.3 MiB of snapshot
    arrays but 13+ MiB of guest memory."""
    quota = 8 * MiB
    config = f"[tenant_quotas.attacker]\nguest_memory_bytes = {quota}\n"
    with daemon(tmp_path, config) as d:
        att = Tenant(d.tcp, ATTACKER)
        vm = await att.new_vm(64)
        await att.call(att.api.mem.WriteGuest, pb.WriteGuestRequest(vm=vm, gpa=0, data=b"x" * 8))
        header, arrays = decode(await _snapshot(att, vm))
        pages = 40_000
        header["slots"][0]["npages"] = 1 << 30
        header["slots"][0]["memory_pages"] = pages
        arrays["s0_mem_index"] = np.arange(pages, dtype=np.int64) * 4097
        arrays["s0_mem_lo"] = np.zeros(pages, dtype=np.int64)
        arrays["s0_mem_len"] = np.full(pages, 8, dtype=np.int64)
        arrays["s0_mem_data"] = np.ones(8 * pages, dtype=np.uint8)
        snap = encode(header, arrays)

        await refused(_restore(att, "wide", [snap]), "guest_memory_bytes")
        await att.close()


async def test_a_recording_stops_at_recording_bytes(tmp_path: Path) -> None:
    with daemon(tmp_path, "[tenant_quotas.attacker]\nrecording_bytes = 65536\n") as d:
        att = Tenant(d.tcp, ATTACKER)
        vm = await att.new_vm(64, pb.VmOptions(record=True))
        for i in range(64):
            await att.call(att.api.mem.WriteGuestBatch, pb.WriteGuestBatchRequest(
                vm=vm, gpa=[8 * k for k in range(64)], vcpu=[0], length=[8] * 64,
                data=bytes([i]) * 512))

        async def read() -> None:
            async for _ in att.api.admin.GetRecording(
                pb.GetRecordingRequest(vm=vm), metadata=att.md
            ):
                pass

        await refused(read(), "recording_bytes")
        await att.close()
