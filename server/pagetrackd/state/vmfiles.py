"""VM files in the state directory: reading one safely, writing one atomically, and
telling whether a VM changed since its file was written."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np

from pagetrack import snapshot_format as fmt
from pagetrackd.application import VmEntry
from pagetrackd.files import write_atomic_with
from pagetrackd.state.container import SnapshotError

__all__ = ["read_regular", "signature", "write_vm_file"]


def read_regular(path: Path) -> bytes:
    """The bytes of ``path`` if it is a regular file; a FIFO, device or directory named
    like a state file is refused at once instead of blocking the start."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SnapshotError("not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def write_vm_file(path: Path, header: dict[str, Any],
                  arrays: dict[str, np.ndarray[Any, Any]],
                  version: int = fmt.STATE_FORMAT_VERSION) -> None:
    """Replace ``path`` with the snapshot of ``header`` and ``arrays``: written to a
    temporary name (streaming, see :func:`pagetrack.snapshot_format.write_snapshot`),
    fsynced, renamed over, the directory fsynced. On any error the temporary file is
    removed and the old file is left as it was."""
    write_atomic_with(path, lambda f: fmt.write_snapshot(f, header, arrays, version=version))


def signature(entry: VmEntry, ttl_leases: set[str]) -> str:
    """Changes whenever anything a snapshot holds may have changed."""
    vm = entry.vm
    parts: list[Any] = [
        vm.generation, vm.seq, vm.vcpus, vm.dma_policy.value, vm.semantics.value,
        repr(vm.cost), repr(vm.stats), [repr(s) for s in vm.memslots()],
        [len(s.dirty) if s.dirty is not None else -1 for s in vm.slots.slots()],
        sorted(ttl_leases),
        [
            (k, repr(entry.plugin_options.get(k)), repr(p.status()))
            for k, p in entry.plugins.items()
        ],
    ]
    return hashlib.sha256(repr(parts).encode()).hexdigest()
