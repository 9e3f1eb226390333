"""Saved VM state: snapshots of one VM (the file format is shared with the client, in
:mod:`pagetrack.snapshot_format`) and the daemon's state directory.

Modules, each with one job:

* :mod:`.container`: the shared format as the daemon uses it (errors, typed readers);
* :mod:`.snapshot`: a live VM captured as a snapshot, and snapshot bytes read back;
* :mod:`.history_records` and :mod:`.plugin_records`: the event history and the
  attached plugins inside a snapshot;
* :mod:`.restore`: a snapshot made a registered VM again;
* :mod:`.format_port`: all that as the application's snapshot port;
* :mod:`.incremental`: a VM's state-directory file and the memory chunks and history
  segments beside it, written as they change;
* :mod:`.vmfiles` and :mod:`.leases_file`: the files of the state directory;
* :mod:`.directory`: :class:`StateDir`, loading at start and saving as the daemon runs.
"""

from pagetrackd.state.container import (
    FORMAT_VERSION,
    SUFFIX,
    SnapshotError,
    decode,
    encode,
    snapshot_length,
)
from pagetrackd.state.directory import StateDir
from pagetrackd.state.format_port import StateSnapshots
from pagetrackd.state.incremental import read_vm_file, self_contained
from pagetrackd.state.restore import prepare_vm, restore_snapshot
from pagetrackd.state.snapshot import Snapshot, capture_entry, read_snapshot, snapshot_entry

__all__ = [
    "FORMAT_VERSION",
    "SUFFIX",
    "Snapshot",
    "SnapshotError",
    "StateDir",
    "StateSnapshots",
    "capture_entry",
    "decode",
    "encode",
    "prepare_vm",
    "read_snapshot",
    "read_vm_file",
    "restore_snapshot",
    "self_contained",
    "snapshot_entry",
    "snapshot_length",
]
