"""The snapshot container as the daemon uses it: the shared format of
:mod:`pagetrack.snapshot_format`, its errors as the domain's InvalidArgument, and the
typed readers of a decoded header and its arrays."""

from __future__ import annotations

from typing import Any

import numpy as np

from pagetrack import snapshot_format as fmt
from pagetrack.snapshot_format import FORMAT_VERSION, STATE_FORMAT_VERSION
from pagetrackd.domain import InvalidArgument

__all__ = [
    "FORMAT_VERSION",
    "STATE_FORMAT_VERSION",
    "SUFFIX",
    "SnapshotError",
    "decode",
    "encode",
    "header_field",
    "int_vector",
    "snapshot_length",
]

#: the name ending of a VM file in the state directory
SUFFIX = ".ptvm"


class SnapshotError(InvalidArgument):
    """Raised for snapshot bytes that are cut short, corrupt or of an unknown version."""

    field = "data"  # the request field that carries the snapshot


def encode(header: dict[str, Any], arrays: dict[str, np.ndarray[Any, Any]]) -> bytes:
    """The (self-contained, version 1) snapshot file for ``header`` and ``arrays``."""
    return fmt.encode(header, arrays)


#: what RestoreVm reads: only self-contained snapshots
UPLOAD_VERSIONS = (FORMAT_VERSION,)


def decode(data: bytes | memoryview, *, versions: tuple[int, ...] = UPLOAD_VERSIONS
           ) -> tuple[dict[str, Any], dict[str, np.ndarray[Any, Any]]]:
    """Header and arrays of a snapshot file of one of ``versions``. Raises SnapshotError
    saying what is wrong."""
    try:
        return fmt.decode(data, versions=versions)
    except fmt.SnapshotFormatError as exc:
        raise SnapshotError(str(exc)) from None


def snapshot_length(prefix: bytes) -> int | None:
    """The whole file's length as its first bytes declare it (None: not enough bytes yet).
    Raises SnapshotError for bytes that are not a snapshot, so an upload is refused on
    its first message."""
    try:
        if len(prefix) >= fmt.PREFIX_BYTES:
            fmt.header_length(prefix, versions=UPLOAD_VERSIONS)
        return fmt.snapshot_length(prefix)
    except fmt.SnapshotFormatError as exc:
        raise SnapshotError(str(exc)) from None


def header_field(d: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """``d[key]`` if ``d`` is an object holding a ``kind`` there (never a bool for int),
    else SnapshotError naming ``where``."""
    if not isinstance(d, dict) or key not in d:
        raise SnapshotError(f"snapshot header: {where} has no {key!r}")
    value = d[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SnapshotError(f"snapshot header: {where}.{key} has the wrong type")
    return value


def int_vector(arrays: dict[str, np.ndarray[Any, Any]], key: str) -> np.ndarray[Any, Any]:
    """The integer vector ``arrays[key]``, else SnapshotError."""
    a = arrays.get(key)
    if a is None:
        raise SnapshotError(f"snapshot payload has no array {key!r}")
    if a.ndim != 1 or a.dtype.kind not in "iu":
        raise SnapshotError(f"snapshot array {key!r} is not a vector of integers")
    return a
