"""Incremental VM saves: a save writes only what changed since the VM's last save.

A VM's state-directory file (``<vm>.ptvm``, format version 2) holds what is small and
rewritten whole each time (options, memslots, tracking, statistics, plugins) and names
the files beside it, in ``parts/<tenant>/<vm>/`` (see :func:`files_dir`):

* **memory files**, each holding some 1 MiB chunks of one memslot's guest memory
  (:data:`pagetrackd.domain.memory.CHUNK_PAGES` pages a chunk). A save writes the chunks
  written since the last save (the memory's dirty set) into new files; a chunk's newest
  file is the one the VM file names.
* **history segments**, each holding the events, region records and findings stored
  since the save before; once the ring holds nothing of a segment any more, it goes.

The copy of a VM is taken on the event loop at one instant: header, tracking and the
history's new items at once (the history's items are immutable), guest memory chunk by
chunk over later loop turns, at most :data:`COPY_BUDGET_BYTES` a turn -- a write into a
chunk not copied yet copies it first (:meth:`SlotMemory.begin_save`), so the save holds
the memory as it was at that instant. Files are written in a thread. Crash safety: the
new files are written and fsynced under new names first, then the VM file is replaced
(temporary name, fsync, rename, directory fsync), and only then are the files it no
longer names deleted. A crash at any point leaves the old VM file and every file it
names; files no VM file names are removed at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pagetrack import snapshot_format as fmt
from pagetrack.snapshot_format import STATE_FORMAT_VERSION
from pagetrackd.application import VmEntry
from pagetrackd.domain.errors import Compacted
from pagetrackd.domain.findings import Finding
from pagetrackd.domain.history import History
from pagetrackd.domain.memory import ChunkCopy, SlotMemory
from pagetrackd.domain.snapshot import slot_memories
from pagetrackd.domain.stream_records import RegionRemoved, Stamped
from pagetrackd.files import fsync_dir
from pagetrackd.state.container import SUFFIX, SnapshotError, header_field
from pagetrackd.state.history_records import (
    SavedItem,
    cut_history,
    history_arrays,
    history_header,
    merge_segments,
    read_history,
    segment_dump,
)
from pagetrackd.state.snapshot import Snapshot, snapshot_from
from pagetrackd.state.vmfiles import read_regular, write_vm_file

__all__ = [
    "COPY_BUDGET_BYTES", "SavedFiles", "VmGone", "bind_loaded", "files_dir", "load_parts",
    "begin_save", "read_vm_file", "remove_unnamed", "save_vm", "self_contained",
]

#: guest memory copied on the event loop per turn (a few ms); also the most one memory
#: file holds
COPY_BUDGET_BYTES = 8 << 20
_READ_VERSIONS = (fmt.FORMAT_VERSION, STATE_FORMAT_VERSION)


class VmGone(Exception):
    """The VM was deleted while its save ran: nothing of it is kept."""


def files_dir(path: Path) -> Path:
    """Where the files a VM file names live: ``STATE_DIR/vms/<tenant>/<vm>.ptvm`` names
    files in ``STATE_DIR/parts/<tenant>/<vm>/``."""
    return path.parent.parent.parent / "parts" / path.parent.name / path.name[: -len(SUFFIX)]


@dataclass(frozen=True, slots=True)
class Segment:
    """A history segment file: the items after seq ``first - 1`` up to ``last``."""

    file: str
    first: int
    last: int


@dataclass(slots=True)
class SavedFiles:
    """What a VM's file names, and what the next save needs to write only the rest."""

    #: slot id -> (the memory saved, chunk -> its newest file)
    memory: dict[int, tuple[SlotMemory, dict[int, str]]] = field(default_factory=dict)
    segments: list[Segment] = field(default_factory=list)
    history: History | None = None  #: the history the segments are of
    upto: int = 0  #: events and findings up to this seq are in the segments
    last_item: SavedItem | None = None
    counter: int = 0  #: saves made, for new file names

    def names(self) -> set[str]:
        """Every file named."""
        out = {s.file for s in self.segments}
        for _, chunks in self.memory.values():
            out.update(chunks.values())
        return out


def _write_files(directory: Path, files: list[tuple[str, dict[str, Any],
                                                    dict[str, np.ndarray[Any, Any]]]]) -> None:
    """Write new side files (never named yet, so written in place), fsynced."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, header, arrays in files:
        path = directory / name
        try:
            with open(path, "w+b") as f:
                fmt.write_snapshot(f, header, arrays, version=STATE_FORMAT_VERSION)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                path.unlink()
            raise
    fsync_dir(directory)


def _remove(directory: Path, names: set[str]) -> None:
    for name in names:
        with contextlib.suppress(OSError):
            (directory / name).unlink()
    with contextlib.suppress(OSError):
        fsync_dir(directory)


def _memory_file(slot_id: int, copies: list[ChunkCopy]) -> tuple[dict[str, Any],
                                                                  dict[str, np.ndarray[Any, Any]]]:
    arrays: dict[str, np.ndarray[Any, Any]] = {}
    for j, c in enumerate(copies):
        arrays[f"c{j}_pages"] = c.pages
        arrays[f"c{j}_lo"] = c.lo.astype(np.uint16)
        arrays[f"c{j}_len"] = c.length.astype(np.uint16)
        arrays[f"c{j}_data"] = np.frombuffer(c.data, dtype=np.uint8)
    header = {"kind": "pagetrack.memory", "slot_id": slot_id, "chunks": [c.chunk for c in copies]}
    return header, arrays


class _Save:
    """One VM's save in progress."""

    def __init__(self, entry: VmEntry, path: Path, prev: SavedFiles | None,
                 include_memory: bool) -> None:
        self.entry = entry
        self.vm = entry.vm
        self.include_memory = include_memory
        self.directory = files_dir(path)
        self.path = path
        prev = prev or SavedFiles()
        self.prev = prev
        self.new = SavedFiles(counter=prev.counter + 1)
        self.written: set[str] = set()  #: new files, removed again if the save fails
        history = entry.hub.history
        same = prev.history is history
        self.cut = cut_history(history, self.vm.seq, prev.upto if same else 0,
                               prev.last_item if same else None)
        self.new.history = history
        self.new.upto = self.cut.upto
        self.new.last_item = self.cut.last
        self.new.segments = [
            s for s in (prev.segments if same else []) if s.last >= self.cut.oldest_seq - 1
        ]
        #: slot id -> (memory, the chunks this save writes)
        self.cuts: dict[int, tuple[SlotMemory, list[int]]] = {}
        if include_memory:
            for slot_id, memory in slot_memories(self.vm).items():
                saved = prev.memory.get(slot_id)
                chunks = dict(saved[1]) if saved is not None and saved[0] is memory else {}
                self.new.memory[slot_id] = (memory, chunks)
                self.cuts[slot_id] = (memory, memory.begin_save())

    def _name(self, kind: str, *parts: int) -> str:
        return f"{kind}{'-'.join(map(str, parts))}-{self.new.counter}.ptc"

    async def _write(self, files: list[tuple[str, dict[str, Any],
                                             dict[str, np.ndarray[Any, Any]]]]) -> None:
        self.written.update(name for name, _, _ in files)
        await asyncio.to_thread(_write_files, self.directory, files)
        if self.vm.closed:
            raise VmGone

    def history(self) -> list[tuple[str, dict[str, Any], dict[str, np.ndarray[Any, Any]]]]:
        """The new history segment's file (none when nothing new), to be written with the
        first memory file (one thread call, one directory fsync)."""
        items = self.cut.items
        if not items:
            return []
        first = self.prev.upto + 1 if self.new.segments else self.cut.oldest_seq
        dump = segment_dump(items, first)
        name = self._name("h", first, self.cut.upto)
        header = {"kind": "pagetrack.history", **history_header(dump)}
        self.new.segments.append(Segment(name, first, self.cut.upto))
        return [(name, header, history_arrays(dump))]

    async def memory(
        self, pending: list[tuple[str, dict[str, Any], dict[str, np.ndarray[Any, Any]]]]
    ) -> None:
        """Copy and write the memory chunks, ``pending`` files with the first of them."""
        for slot_id, (memory, chunks) in self.cuts.items():
            files = self.new.memory[slot_id][1]
            i = 0
            while i < len(chunks):
                copies: list[ChunkCopy] = []
                size = 0
                while i < len(chunks) and size < COPY_BUDGET_BYTES:
                    copies.append(memory.take_chunk(chunks[i]))
                    size += len(copies[-1].data) + 16 * copies[-1].pages.size
                    i += 1
                name = self._name("m", slot_id, chunks[i - 1])
                await self._write([*pending, (name, *_memory_file(slot_id, copies))])
                pending = []
                files.update((c.chunk, name) for c in copies)
        if pending:
            await self._write(pending)

    def finish(self, ok: bool) -> None:
        """End the memory cuts: on failure their chunks are dirty again."""
        for memory, chunks in self.cuts.values():
            memory.end_save(() if ok else chunks)

    def header_lists(self) -> dict[str, Any]:
        return {
            "memory_files": [
                [slot_id, chunk, name]
                for slot_id, (_, chunks) in sorted(self.new.memory.items())
                for chunk, name in sorted(chunks.items())
            ],
            "history_files": [[s.file, s.first, s.last] for s in self.new.segments],
        }


def begin_save(entry: VmEntry, path: Path, prev: SavedFiles | None,
               *, include_memory: bool) -> _Save:
    """The VM's cut, taken now: what :func:`save_vm` writes is the VM as it is at this
    call (memory not yet copied is copied first by a write that would change it)."""
    return _Save(entry, path, prev, include_memory)


async def save_vm(save: _Save, header: dict[str, Any],
                  arrays: dict[str, np.ndarray[Any, Any]]) -> SavedFiles:
    """Write the VM's file (``header`` and ``arrays``: its small parts, copied with the
    cut ``save``) and the side files of what changed since the previous save; returns what
    the file names now. Raises VmGone if the VM was deleted meanwhile, OSError (or a bug's
    exception) if a file could not be written: the previous file and what it names are
    left then."""
    entry, path, include_memory = save.entry, save.path, save.include_memory
    history = entry.hub.history
    header["history"].update(
        oldest_seq=save.cut.oldest_seq,
        lost=[[a, b] for a, b in history.lost if b >= save.cut.oldest_seq],
    )
    header["vm"]["memory_included"] = include_memory
    header.update(save.header_lists())  # placeholders; the final lists follow
    try:
        await save.memory(save.history())
        header.update(save.header_lists())
        await asyncio.to_thread(write_vm_file, path, header, arrays, STATE_FORMAT_VERSION)
    except BaseException:
        save.finish(ok=False)
        await asyncio.to_thread(_remove, save.directory, save.written)
        raise
    save.finish(ok=True)
    old = save.prev.names() - save.new.names()
    if old:
        await asyncio.to_thread(_remove, save.directory, old)
    return save.new


# ---------------------------------------------------------------------- loading


def _decode(path: Path, kind: str) -> tuple[dict[str, Any], dict[str, np.ndarray[Any, Any]]]:
    try:
        _, header, arrays = fmt.decode_versioned(read_regular(path), versions=_READ_VERSIONS)
    except fmt.SnapshotFormatError as exc:
        raise SnapshotError(f"{path.name}: {exc}") from None
    if header.get("kind") != kind:
        raise SnapshotError(f"{path.name} holds {header.get('kind')!r}, not {kind!r}")
    return header, arrays


def _pairs(header: dict[str, Any], key: str, width: int) -> Iterator[list[Any]]:
    rows = header.get(key, [])
    if not isinstance(rows, list):
        raise SnapshotError(f"snapshot header: {key} is not a list")
    for row in rows:
        if not isinstance(row, list) or len(row) != width:
            raise SnapshotError(f"snapshot header: {key} holds a malformed row")
        yield row


def _name(value: Any) -> str:
    if not isinstance(value, str) or "/" in value or value.startswith("."):
        raise SnapshotError(f"snapshot header: {value!r:.60} is not a side file name")
    return value


def _load_memory(header: dict[str, Any], arrays: dict[str, np.ndarray[Any, Any]],
                 directory: Path, saved: SavedFiles) -> None:
    """Put each slot's chunks into ``arrays`` as a version 1 file holds its memory."""
    wanted: dict[int, dict[int, str]] = {}
    for slot_id, chunk, name in _pairs(header, "memory_files", 3):
        wanted.setdefault(int(slot_id), {})[int(chunk)] = _name(name)
    files: dict[str, tuple[dict[str, Any], dict[str, np.ndarray[Any, Any]]]] = {}
    for i, sh in enumerate(header_field(header, "slots", list, "header")):
        slot_id = header_field(sh, "slot_id", int, f"slots[{i}]")
        chunks = wanted.pop(slot_id, {})
        parts: list[tuple[int, np.ndarray[Any, Any], np.ndarray[Any, Any],
                          np.ndarray[Any, Any], np.ndarray[Any, Any]]] = []
        for chunk, name in sorted(chunks.items()):
            if name not in files:
                files[name] = _decode(directory / name, "pagetrack.memory")
            fh, fa = files[name]
            listed = fh.get("chunks")
            if not isinstance(listed, list) or chunk not in listed:
                raise SnapshotError(f"{name} does not hold chunk {chunk} of slot {slot_id}")
            j = listed.index(chunk)
            parts.append((chunk, fa[f"c{j}_pages"], fa[f"c{j}_lo"], fa[f"c{j}_len"],
                          fa[f"c{j}_data"]))
        sh["memory_pages"] = sum(int(p[1].size) for p in parts)
        if parts:
            arrays[f"s{i}_mem_index"] = np.concatenate([p[1] for p in parts])
            arrays[f"s{i}_mem_lo"] = np.concatenate([p[2] for p in parts])
            arrays[f"s{i}_mem_len"] = np.concatenate([p[3] for p in parts])
            arrays[f"s{i}_mem_data"] = np.concatenate([p[4] for p in parts])
        saved.memory[slot_id] = (SlotMemory(), chunks)  # the loaded memory replaces it
    if wanted:
        raise SnapshotError(f"memory files name slots {sorted(wanted)} the VM does not have")


def _load_history(header: dict[str, Any], arrays: dict[str, np.ndarray[Any, Any]],
                  directory: Path, saved: SavedFiles) -> None:
    """Join the history segments and put them into ``header`` and ``arrays`` as a
    version 1 file holds its history."""
    hist = header_field(header, "history", dict, "header")
    if "oldest_seq" not in hist:
        return
    oldest = header_field(hist, "oldest_seq", int, "history")
    parts = []
    for name, first, last in _pairs(header, "history_files", 3):
        sh, sa = _decode(directory / _name(name), "pagetrack.history")
        dump = read_history({**sh, "oldest_seq": first}, sa)
        if dump is None:
            raise SnapshotError(f"{name} holds no history")
        parts.append(dump)
        saved.segments.append(Segment(name, int(first), int(last)))
    lost = [(int(a), int(b)) for a, b in _pairs(hist, "lost", 2)]
    dump = merge_segments(parts, oldest, lost)
    arrays.update(history_arrays(dump))
    hist.update(history_header(dump))


def load_parts(path: Path, header: dict[str, Any], arrays: dict[str, np.ndarray[Any, Any]]
               ) -> SavedFiles:
    """Complete the header and arrays of a version 2 VM file with the side files it
    names, in place, so that they read as a version 1 file; returns what it names.
    Raises SnapshotError (or OSError) when a side file is missing or damaged."""
    directory = files_dir(path)
    saved = SavedFiles()
    try:
        _load_memory(header, arrays, directory, saved)
        _load_history(header, arrays, directory, saved)
    except (KeyError, TypeError, ValueError) as exc:
        raise SnapshotError(f"side files of {path.name}: {type(exc).__name__}: {exc}") from None
    vm = header.get("vm")
    if isinstance(vm, dict) and isinstance(vm.get("seq"), int):
        saved.upto = vm["seq"]
    return saved


def bind_loaded(saved: SavedFiles, entry: VmEntry) -> None:
    """After ``entry`` was loaded from the files ``saved`` lists: those files hold its
    memory and history as they are now, so the next save writes only what changes."""
    memories = slot_memories(entry.vm)
    for slot_id, (_, chunks) in list(saved.memory.items()):
        memory = memories.get(slot_id)
        if memory is None:
            del saved.memory[slot_id]
            continue
        memory.mark_saved()  # loading wrote every chunk; the files hold them
        saved.memory[slot_id] = (memory, chunks)
    history = entry.hub.history
    saved.history = history
    try:
        items = history.since(history.oldest_seq, entry.vm.seq)
    except Compacted:
        items = []
    held = [i for i in items if isinstance(i, Stamped | RegionRemoved | Finding)]
    saved.last_item = held[-1] if held else None


def remove_unnamed(path: Path, saved: SavedFiles | None) -> None:
    """Delete the side files ``path`` does not name (a crash mid-save left them), or the
    whole side directory when there is no VM file."""
    directory = files_dir(path)
    if not directory.is_dir():
        return
    if saved is None:
        shutil.rmtree(directory, ignore_errors=True)
        return
    names = saved.names()
    _remove(directory, {p.name for p in directory.iterdir() if p.name not in names})


def read_vm_file(path: Path) -> tuple[Snapshot, SavedFiles | None]:
    """A state-directory VM file of either version, with the side files it names, as a
    checked snapshot; and what it names (None for version 1, which names nothing).
    Raises SnapshotError or OSError."""
    data = read_regular(path)
    try:
        version, header, arrays = fmt.decode_versioned(data, versions=_READ_VERSIONS)
    except fmt.SnapshotFormatError as exc:
        raise SnapshotError(str(exc)) from None
    files = load_parts(path, header, arrays) if version >= STATE_FORMAT_VERSION else None
    return snapshot_from(header, arrays, hashlib.sha256(data).digest()), files


def self_contained(path: Path) -> bytes:
    """A state-directory VM file of either version, with what it names, as one
    self-contained (version 1) snapshot: what RestoreVm and ``pagetrack restore`` read."""
    data = read_regular(path)
    try:
        version, header, arrays = fmt.decode_versioned(data, versions=_READ_VERSIONS)
    except fmt.SnapshotFormatError as exc:
        raise SnapshotError(str(exc)) from None
    if version < STATE_FORMAT_VERSION:
        return data
    load_parts(path, header, arrays)
    for key in ("arrays", "memory_files", "history_files"):
        header.pop(key, None)
    header["format_version"] = fmt.FORMAT_VERSION
    return fmt.encode(header, arrays)
