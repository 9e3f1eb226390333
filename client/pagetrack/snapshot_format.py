"""The VM snapshot file format, the one definition that the client and the daemon share.

One snapshot holds one VM. Its layout (all integers little-endian)::

    b"PTVMSNAP"                     8 bytes, magic
    format_version                  u32 (one of READABLE_VERSIONS)
    header_len                      u32
    header                          header_len bytes of UTF-8 JSON (tenant, name, options,
                                    limits, seq, statistics, memslots, plugins, leases)
    payload_len                     u64
    payload                         the VM's arrays: an .npz archive (version 1; numpy,
                                    no pickles, members stored uncompressed) or raw
                                    (version 2, see below)
    sha256                          32 bytes, of everything before it

Version 1 is the whole VM in one file (what SnapshotVm sends and RestoreVm reads); its
payload is an .npz archive. Version 2 is the container of the daemon's state directory,
whose VM files may name further files kept beside them (guest memory chunks, history
segments; see ``pagetrackd.state.incremental``). Its payload is the arrays' bytes one
after the other, each padded to 8 bytes, described by the header's ``arrays`` list of
``[name, dtype, count]``: no zip to walk and no CRC computed in Python, and the arrays
are read as views of the file's bytes. A reader of this module accepts both.

A file cut short, with a flipped bit, or of another version is refused with a
:class:`SnapshotFormatError` that says which.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from typing import IO, Any

import numpy as np

__all__ = [
    "DIGEST_BYTES",
    "FORMAT_VERSION",
    "MAGIC",
    "MIN_BYTES",
    "PREFIX_BYTES",
    "READABLE_VERSIONS",
    "STATE_FORMAT_VERSION",
    "SnapshotFormatError",
    "decode",
    "decode_versioned",
    "encode",
    "header_length",
    "read_header",
    "snapshot_length",
    "write_snapshot",
]

MAGIC = b"PTVMSNAP"
#: the version of a self-contained snapshot (SnapshotVm / RestoreVm)
FORMAT_VERSION = 1
#: the version of a state-directory VM file (its header may name files beside it)
STATE_FORMAT_VERSION = 2
READABLE_VERSIONS = (FORMAT_VERSION, STATE_FORMAT_VERSION)
PREFIX_BYTES = 16  #: magic, version, header length
DIGEST_BYTES = 32
#: the smallest possible snapshot: prefix, payload length, digest
MIN_BYTES = PREFIX_BYTES + 8 + DIGEST_BYTES
#: a header larger than this is not ours (a VM's header is a few KiB)
MAX_HEADER_BYTES = 64 << 20

class SnapshotFormatError(ValueError):
    """Snapshot bytes that are cut short, corrupt or of an unknown version."""


def _prefix(head: bytes, version: int) -> bytes:
    return MAGIC + version.to_bytes(4, "little") + len(head).to_bytes(4, "little")


def _dump_header(header: dict[str, Any]) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def header_length(buf: bytes | memoryview, *, versions: tuple[int, ...] = READABLE_VERSIONS
                  ) -> tuple[int, int]:
    """``(format_version, header_len)`` that a snapshot's fixed prefix declares (``buf``
    holds at least :data:`PREFIX_BYTES`). Raises SnapshotFormatError for bytes that are
    not a snapshot of one of ``versions``."""
    view = memoryview(buf).cast("B")
    if bytes(view[:8]) != MAGIC:
        raise SnapshotFormatError("not a pagetrack VM snapshot (bad magic bytes)")
    version = int.from_bytes(view[8:12], "little")
    hlen = int.from_bytes(view[12:16], "little")
    if version not in versions:
        raise SnapshotFormatError(
            f"snapshot format_version {version} is not supported; this reader reads"
            f" version {' or '.join(map(str, versions))}"
        )
    if hlen > MAX_HEADER_BYTES:
        raise SnapshotFormatError(
            f"snapshot header length {hlen} is implausible; the file is corrupt"
        )
    return version, hlen


def snapshot_length(prefix: bytes) -> int | None:
    """The whole file's length as its first bytes declare it, or None while fewer than
    ``prefix + header + 8`` bytes are there. Raises SnapshotFormatError for bytes that
    are not a snapshot, so an upload is refused on its first message."""
    if len(prefix) < PREFIX_BYTES:
        return None
    _, hlen = header_length(prefix)
    at = PREFIX_BYTES + hlen
    if len(prefix) < at + 8:
        return None
    plen = int.from_bytes(prefix[at : at + 8], "little")
    return at + 8 + plen + DIGEST_BYTES


def encode(header: dict[str, Any], arrays: dict[str, np.ndarray[Any, Any]],
           *, version: int = FORMAT_VERSION) -> bytes:
    """The snapshot file for ``header`` (JSON-able) and ``arrays`` (numeric)."""
    out = io.BytesIO()
    write_snapshot(out, header, arrays, version=version)
    return out.getvalue()


def write_snapshot(f: IO[bytes], header: dict[str, Any],
                   arrays: dict[str, np.ndarray[Any, Any]], *,
                   version: int = FORMAT_VERSION) -> int:
    """Write the snapshot of ``header`` and ``arrays`` to ``f`` (readable, seekable and
    empty), streaming: the arrays go to the file as they are encoded and the checksum is
    taken reading it back, so a large VM is not held in memory a second time. Returns
    the bytes written."""
    if version >= STATE_FORMAT_VERSION:
        arrays = {k: np.ascontiguousarray(a) for k, a in arrays.items()}
        header = dict(header, arrays=[[k, a.dtype.str, int(a.size)] for k, a in arrays.items()])
    head = _dump_header(header)
    f.write(_prefix(head, version))
    f.write(head)
    at = f.tell()
    f.write(bytes(8))
    if version >= STATE_FORMAT_VERSION:
        for a in arrays.values():
            f.write(a.reshape(-1).data)
            f.write(bytes(-a.nbytes % 8))
    else:
        np.savez(f, allow_pickle=False, **arrays)
    end = f.tell()
    f.seek(at)
    f.write((end - at - 8).to_bytes(8, "little"))
    f.seek(0)
    digest = hashlib.sha256()
    while chunk := f.read(1 << 20):
        digest.update(chunk)
    f.write(digest.digest())
    return end + DIGEST_BYTES


def read_header(data: bytes | memoryview, *, versions: tuple[int, ...] = READABLE_VERSIONS
                ) -> tuple[int, dict[str, Any], int]:
    """Check a whole snapshot's prefix, length and sha256 and parse its header: returns
    ``(format_version, header, payload offset)``. Raises SnapshotFormatError saying
    what is wrong."""
    view = memoryview(data).cast("B")
    n = len(view)
    if n < PREFIX_BYTES:
        raise SnapshotFormatError(f"snapshot truncated: {n} bytes, not even a header")
    version, hlen = header_length(view, versions=versions)
    at = PREFIX_BYTES + hlen
    if n < at + 8:
        raise SnapshotFormatError(
            f"snapshot truncated: {n} bytes, the header alone needs {at + 8}"
        )
    plen = int.from_bytes(view[at : at + 8], "little")
    want = at + 8 + plen + DIGEST_BYTES
    if n < want:
        raise SnapshotFormatError(f"snapshot truncated: {n} bytes of {want}")
    if n > want:
        raise SnapshotFormatError(
            f"snapshot has {n - want} bytes of trailing garbage after {want}"
        )
    if hashlib.sha256(view[: want - DIGEST_BYTES]).digest() != bytes(view[want - DIGEST_BYTES:]):
        raise SnapshotFormatError("snapshot sha256 mismatch: the data is corrupt")
    try:
        header = json.loads(bytes(view[PREFIX_BYTES:at]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SnapshotFormatError(f"snapshot header is not valid JSON: {exc}") from None
    except RecursionError:
        raise SnapshotFormatError("snapshot header nests JSON too deeply") from None
    if not isinstance(header, dict):
        raise SnapshotFormatError("snapshot header is not a JSON object")
    return version, header, at + 8


def _check_members(payload: memoryview) -> None:
    """The arrays' zip members must be stored as they are (both sides write them so): a
    compressed member could decode to far more than was uploaded."""
    try:
        with zipfile.ZipFile(io.BytesIO(payload)) as z:
            infos = z.infolist()
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise SnapshotFormatError(f"snapshot arrays cannot be read: {exc}") from None
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            raise SnapshotFormatError(
                f"snapshot array {info.filename!r} is compressed; snapshots store arrays"
                " uncompressed"
            )
    if sum(i.file_size for i in infos) > len(payload):
        raise SnapshotFormatError("snapshot arrays declare more bytes than the file holds")


def decode(data: bytes | memoryview, *, versions: tuple[int, ...] = READABLE_VERSIONS
           ) -> tuple[dict[str, Any], dict[str, np.ndarray[Any, Any]]]:
    """Header and arrays of a snapshot file. Raises SnapshotFormatError saying what is
    wrong."""
    _, header, arrays = decode_versioned(data, versions=versions)
    return header, arrays


def decode_versioned(data: bytes | memoryview, *,
                     versions: tuple[int, ...] = READABLE_VERSIONS
                     ) -> tuple[int, dict[str, Any], dict[str, np.ndarray[Any, Any]]]:
    """``(format_version, header, arrays)`` of a snapshot file, as :func:`decode`."""
    version, header, at = read_header(data, versions=versions)
    payload = memoryview(data).cast("B")[at:-DIGEST_BYTES]
    if version >= STATE_FORMAT_VERSION:
        return version, header, _raw_arrays(header, payload)
    _check_members(payload)
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise SnapshotFormatError(f"snapshot arrays cannot be read: {exc}") from None
    return version, header, arrays


#: the element types a version 2 payload may hold (numbers only: nothing to unpickle)
RAW_DTYPES = frozenset({"|b1", "|u1", "|i1", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8"})


def _raw_arrays(header: dict[str, Any], payload: memoryview
                ) -> dict[str, np.ndarray[Any, Any]]:
    """The arrays of a version 2 payload, as read-only views of its bytes."""
    manifest = header.get("arrays")
    if not isinstance(manifest, list):
        raise SnapshotFormatError("snapshot header has no arrays list")
    out: dict[str, np.ndarray[Any, Any]] = {}
    at = 0
    for entry in manifest:
        if (
            not isinstance(entry, list) or len(entry) != 3 or not isinstance(entry[0], str)
            or entry[1] not in RAW_DTYPES or not isinstance(entry[2], int)
            or isinstance(entry[2], bool) or entry[2] < 0 or entry[0] in out
        ):
            raise SnapshotFormatError(f"snapshot header: bad arrays entry {entry!r:.80}")
        dtype = np.dtype(entry[1])
        n = entry[2] * dtype.itemsize
        if at + n > len(payload):
            raise SnapshotFormatError("snapshot arrays declare more bytes than the file holds")
        out[entry[0]] = np.frombuffer(payload[at : at + n], dtype=dtype)
        at += n + (-n % 8)
    if at != len(payload):
        raise SnapshotFormatError(
            f"snapshot arrays hold {at} bytes but the payload has {len(payload)}"
        )
    return out
