"""A guest GPU driver model: builds and updates gen8 PPGTTs in guest memory, as i915 does.

The driver owns a pool of guest pages for page tables and a range of data pages for
buffer objects. Each GPU context has its own 4-level PPGTT (a PML4 root). Binding a
buffer writes the level-1 entry (PTE) and, first, any missing table on the way down:
a table page is allocated, zeroed if it was used before, and linked into its parent.
Unbinding writes 0; a table whose last entry goes is unlinked and returned to the pool.
Entries are written 8 bytes at a time, or as two 4-byte halves (a 32-bit-style update)
when the random draw says so.

The model never reads guest memory: it mirrors what it wrote, so the stream it produces
depends only on its seed. It produces a queue of :class:`WriteChunk` and :class:`Control`
items; the workload applies chunks with ``Vm.write_batch`` and runs controls (context
submission and destruction) on the vGPU between them.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

from pagetrackd.domain import PAGE_SHIFT, PAGE_SIZE
from pagetrackd.plugins.vgpu import ENTRIES, LEVELS, PTE_PRESENT, PTE_RW, level_shift, va_index

__all__ = ["Context", "Control", "GpuDriver", "WriteChunk"]

#: every context maps its buffers from here (4 GiB), as i915 keeps low GPU va reserved
VA_BASE = 1 << 32
#: command-buffer bytes written per submission
CMD_BYTES = 64
_ZERO_PAGE = bytes(PAGE_SIZE)
_PT_SHIFT = level_shift(2)  #: va >> _PT_SHIFT names a va's level-1 table (2 MiB)
_PT_BASE = VA_BASE >> _PT_SHIFT
_PTE_RW = PTE_PRESENT | PTE_RW
_ZERO_ENTRY = bytes(8)


@dataclass(slots=True)
class WriteChunk:
    """Guest writes to apply in order with one ``write_batch``: all from ``vcpu``."""

    vcpu: int
    gpa: list[int]
    length: list[int]
    data: list[bytes]


@dataclass(frozen=True, slots=True)
class Control:
    """Something the driver does between writes: ``submit`` a context's commands
    (``root_gpa``, ``batch_va``) or ``destroy`` its PPGTT (``root_gpa``)."""

    kind: str
    ctx: int
    root_gpa: int
    batch_va: int = 0


@dataclass(slots=True)
class Context:
    """A GPU context and the driver's mirror of its PPGTT."""

    ctx_id: int
    root_gfn: int
    batch_gfn: int  #: data page holding this context's command buffer
    #: (level, va >> level_shift(level + 1)) -> table gfn; the root is (LEVELS, 0)
    tables: dict[tuple[int, int], int] = field(default_factory=dict)
    #: table gfn -> number of present entries in it
    used: dict[int, int] = field(default_factory=dict)
    #: va page number (vpn) -> data gfn it maps; plus a list for O(1) random choice
    leaves: dict[int, int] = field(default_factory=dict)
    leaf_list: list[int] = field(default_factory=list)
    leaf_pos: dict[int, int] = field(default_factory=dict)
    submitted: bool = False  #: the vGPU has seen (and shadowed) this PPGTT

    @property
    def root_gpa(self) -> int:
        """Guest physical address of the PML4."""
        return self.root_gfn << PAGE_SHIFT


@dataclass(slots=True)
class DriverStats:
    """What the driver did, by kind."""

    writes: int = 0  #: guest writes emitted (a split entry counts two)
    entry_writes: int = 0  #: page-table entries written
    split_entries: int = 0  #: entries written as two 4-byte halves
    maps: int = 0
    unmaps: int = 0
    remaps: int = 0
    table_allocs: int = 0
    table_frees: int = 0
    table_clears: int = 0  #: reused table pages zeroed with one 4 KiB write
    cmd_writes: int = 0
    submissions: int = 0
    contexts_created: int = 0
    contexts_destroyed: int = 0
    bad_gfns: int = 0  #: entries deliberately naming gfns outside the memslots


class GpuDriver:
    """The guest driver. Deterministic: the same seed and sizes give the same items."""

    def __init__(
        self,
        *,
        seed: int,
        table_base_gfn: int,
        table_pages: int,
        data_base_gfn: int,
        data_pages: int,
        va_pages: int = 4096,
        split_fraction: float = 0.05,
        violation_fraction: float = 0.0,
        vcpus: int = 1,
    ) -> None:
        self.rng = random.Random(seed)
        self._random = self.rng.random
        self._getrandbits = self.rng.getrandbits
        self.table_base_gfn = table_base_gfn
        self.data_base_gfn = data_base_gfn
        self.data_pages = data_pages
        self.va_pages = va_pages
        self.split_fraction = split_fraction
        self.violation_fraction = violation_fraction
        self.vcpus = vcpus
        #: free table pages, lowest gfn popped first
        self._free = list(range(table_base_gfn + table_pages - 1, table_base_gfn - 1, -1))
        #: table pages that hold stale entries and must be zeroed before reuse
        self._dirty: set[int] = set()
        self.contexts: dict[int, Context] = {}
        self._next_ctx = 0
        self.stats = DriverStats()
        self.queue: deque[WriteChunk | Control] = deque()
        self._vcpu = 0
        self._chunk: WriteChunk | None = None
        #: a gfn no memslot holds, for violation_fraction (bit 33: past any default slot)
        self.bad_gfn_base = 1 << 33

    # ------------------------------------------------------------------ emitting

    def set_vcpu(self, vcpu: int) -> None:
        """Writes from now on come from ``vcpu``."""
        if vcpu != self._vcpu:
            self._close_chunk()
            self._vcpu = vcpu

    def _below(self, n: int) -> int:
        """A random int in ``[0, n)`` for ``n > 0``: ``rng.randrange(n)``, drawn the way
        CPython's ``Random._randbelow_with_getrandbits`` does (the hot loops inline it)."""
        getrandbits = self._getrandbits
        k = n.bit_length()
        r: int = getrandbits(k)
        while r >= n:
            r = getrandbits(k)
        return r

    def _emit(self, gpa: int, data: bytes) -> None:
        chunk = self._chunk
        if chunk is None:
            chunk = self._chunk = WriteChunk(self._vcpu, [], [], [])
        chunk.gpa.append(gpa)
        chunk.length.append(len(data))
        chunk.data.append(data)
        self.stats.writes += 1

    def _close_chunk(self) -> None:
        if self._chunk is not None:
            self.queue.append(self._chunk)
            self._chunk = None

    def control(self, kind: str, ctx: Context, batch_va: int = 0) -> None:
        """Queue a control item after the writes emitted so far."""
        self._close_chunk()
        self.queue.append(Control(kind, ctx.ctx_id, ctx.root_gpa, batch_va))

    def _write_entry(self, table_gfn: int, index: int, value: int) -> None:
        gpa = (table_gfn << PAGE_SHIFT) + index * 8
        data = value.to_bytes(8, "little")
        stats = self.stats
        stats.entry_writes += 1
        if self._random() < self.split_fraction:
            self._emit_split(gpa, data)
            return
        # _emit, inlined for the common whole-entry write
        chunk = self._chunk
        if chunk is None:
            chunk = self._chunk = WriteChunk(self._vcpu, [], [], [])
        chunk.gpa.append(gpa)
        chunk.length.append(8)
        chunk.data.append(data)
        stats.writes += 1

    def _emit_split(self, gpa: int, data: bytes) -> None:
        """An entry written as two 4-byte halves; usually low dword first, sometimes
        high first."""
        self.stats.split_entries += 1
        if self._random() < 0.75:
            self._emit(gpa, data[:4])
            self._emit(gpa + 4, data[4:])
        else:
            self._emit(gpa + 4, data[4:])
            self._emit(gpa, data[:4])

    # ------------------------------------------------------------------ tables

    def _alloc_table(self) -> int:
        if not self._free:
            raise RuntimeError("the driver's page-table pool is exhausted")
        gfn = self._free.pop()
        self.stats.table_allocs += 1
        if gfn in self._dirty:
            # A reused page still holds old entries: zero it before it is linked.
            self._dirty.discard(gfn)
            self.stats.table_clears += 1
            self._emit(gfn << PAGE_SHIFT, _ZERO_PAGE)
        return gfn

    def _free_table(self, gfn: int) -> None:
        self.stats.table_frees += 1
        self._dirty.add(gfn)
        self._free.append(gfn)

    def vpn_to_va(self, vpn: int) -> int:
        """GPU va of the ``vpn``-th page of a context's window: groups of 4096 pages
        (8 page tables) sit 1 GiB apart, so a context uses several page directories."""
        return VA_BASE + ((vpn >> 12) << 30) + ((vpn & 4095) << PAGE_SHIFT)

    def _walk_create(self, ctx: Context, va: int) -> int:
        """The level-1 table for ``va``, creating and linking missing tables."""
        parent = ctx.root_gfn
        for level in range(LEVELS - 1, 0, -1):
            key = (level, va >> level_shift(level + 1))
            gfn = ctx.tables.get(key)
            if gfn is None:
                gfn = self._alloc_table()
                ctx.tables[key] = gfn
                ctx.used[gfn] = 0
                self._write_entry(
                    parent, va_index(va, level + 1), (gfn << PAGE_SHIFT) | PTE_PRESENT | PTE_RW
                )
                ctx.used[parent] += 1
            parent = gfn
        return parent

    def _release_path(self, ctx: Context, va: int) -> None:
        """Unlink and free the tables on ``va``'s path that became empty, bottom up."""
        for level in range(1, LEVELS):
            key = (level, va >> level_shift(level + 1))
            gfn = ctx.tables[key]
            if ctx.used[gfn]:
                return
            parent = ctx.tables[(level + 1, va >> level_shift(level + 2))]
            self._write_entry(parent, va_index(va, level + 1), 0)
            ctx.used[parent] -= 1
            del ctx.tables[key]
            del ctx.used[gfn]
            self._free_table(gfn)

    # ------------------------------------------------------------------ contexts

    def new_context(self) -> Context:
        """A context with an empty PPGTT (a zeroed PML4 page) and a command buffer."""
        root = self._alloc_table()
        batch = self.data_base_gfn + self._below(self.data_pages)
        ctx = Context(self._next_ctx, root, batch)
        self._next_ctx += 1
        ctx.tables[(LEVELS, 0)] = root
        ctx.used[root] = 0
        self.contexts[ctx.ctx_id] = ctx
        self.stats.contexts_created += 1
        # The command buffer is bound at the first page of the window.
        self.map(ctx, 0, ctx.batch_gfn)
        return ctx

    def destroy_context(self, ctx: Context) -> None:
        """Tell the vGPU (if it ever saw the PPGTT), then return every table to the pool."""
        if ctx.submitted:
            self.control("destroy", ctx)
        for gfn in sorted(ctx.used):
            self._free_table(gfn)
        del self.contexts[ctx.ctx_id]
        self.stats.contexts_destroyed += 1

    def submit(self, ctx: Context) -> None:
        """Write a command buffer (an untracked data page) and queue its submission."""
        n = self.stats.submissions
        cmd = (n.to_bytes(8, "little") + ctx.ctx_id.to_bytes(8, "little")) * (CMD_BYTES // 16)
        self._emit(ctx.batch_gfn << PAGE_SHIFT, cmd)
        self.stats.cmd_writes += 1
        self.stats.submissions += 1
        self.control("submit", ctx, self.vpn_to_va(0))
        ctx.submitted = True

    # ------------------------------------------------------------------ bindings

    def _data_gfn(self) -> int:
        if self.violation_fraction and self._random() < self.violation_fraction:
            self.stats.bad_gfns += 1
            return self.bad_gfn_base + self._below(1 << 20)
        return self.data_base_gfn + self._below(self.data_pages)

    def map(self, ctx: Context, vpn: int, gfn: int | None = None) -> None:
        """Bind data page ``gfn`` (random if None) at ``vpn``; ``vpn`` must be unbound."""
        if gfn is None:
            gfn = self._data_gfn()
        va = VA_BASE + ((vpn >> 12) << 30) + ((vpn & 4095) << PAGE_SHIFT)  # vpn_to_va
        # A level-1 table that exists has its parents (tables go bottom up).
        pt = ctx.tables.get((1, va >> _PT_SHIFT))
        if pt is None:
            pt = self._walk_create(ctx, va)
        self._write_entry(pt, vpn & (ENTRIES - 1), (gfn << PAGE_SHIFT) | _PTE_RW)
        ctx.used[pt] += 1
        ctx.leaves[vpn] = gfn
        ctx.leaf_pos[vpn] = len(ctx.leaf_list)
        ctx.leaf_list.append(vpn)
        self.stats.maps += 1

    def remap(self, ctx: Context, vpn: int) -> None:
        """Point a bound ``vpn`` at another data page (a buffer moved)."""
        gfn = self._data_gfn()
        va = VA_BASE + ((vpn >> 12) << 30) + ((vpn & 4095) << PAGE_SHIFT)  # vpn_to_va
        pt = ctx.tables[(1, va >> _PT_SHIFT)]
        self._write_entry(pt, vpn & (ENTRIES - 1), (gfn << PAGE_SHIFT) | _PTE_RW)
        ctx.leaves[vpn] = gfn
        self.stats.remaps += 1

    def unmap(self, ctx: Context, vpn: int) -> None:
        """Clear a bound ``vpn``'s entry; free tables that became empty."""
        va = VA_BASE + ((vpn >> 12) << 30) + ((vpn & 4095) << PAGE_SHIFT)  # vpn_to_va
        pt = ctx.tables[(1, va >> _PT_SHIFT)]
        self._write_entry(pt, vpn & (ENTRIES - 1), 0)
        ctx.used[pt] -= 1
        del ctx.leaves[vpn]
        pos = ctx.leaf_pos.pop(vpn)
        last = ctx.leaf_list.pop()
        if last != vpn:
            ctx.leaf_list[pos] = last
            ctx.leaf_pos[last] = pos
        self.stats.unmaps += 1
        if not ctx.used[pt]:
            self._release_path(ctx, va)

    def random_unbound(self, ctx: Context) -> int | None:
        """A random unbound vpn of the window (never vpn 0, the command buffer)."""
        below = self._below
        n = self.va_pages - 1
        leaves = ctx.leaves
        for _ in range(16):
            vpn = 1 + below(n)
            if vpn not in leaves:
                return vpn
        return None

    def random_bound(self, ctx: Context) -> int | None:
        """A random bound vpn other than the command buffer's."""
        leaf_list = ctx.leaf_list
        n = len(leaf_list)
        if n <= 1:
            return None
        vpn = leaf_list[self._below(n)]
        return None if vpn == 0 else vpn

    def churn(self, ctx: Context, updates: int, target: int) -> None:
        """``updates`` random binding changes in ``ctx``, each drawn as: map a random
        unbound page (probability 0.30, or 0.45 while at most ``target`` pages are bound,
        and always while fewer than 2 are; if no unbound page is found, fall through),
        else unmap (up to 0.70) or remap a random bound one.

        The same draws, writes and state as that loop over :meth:`random_unbound`,
        :meth:`map`, :meth:`random_bound`, :meth:`unmap` and :meth:`remap`, with their
        common paths inlined: this is where a workload spends its time. (It is longer
        than a function should be on purpose: calling those methods per update made the
        gpu-ppgtt workload some 40% slower in this loop.)"""
        random = self._random
        getrandbits = self._getrandbits
        split = self.split_fraction
        violation = self.violation_fraction
        data_base, data_pages = self.data_base_gfn, self.data_pages
        k_data = data_pages.bit_length()
        n_va = self.va_pages - 1
        k_va = n_va.bit_length()
        leaves, leaf_list, leaf_pos = ctx.leaves, ctx.leaf_list, ctx.leaf_pos
        tables, used = ctx.tables, ctx.used
        chunk = self._chunk
        created = chunk is None
        if chunk is None:
            chunk = self._chunk = WriteChunk(self._vcpu, [], [], [])
        # Tables made or freed on the way (_walk_create, _release_path) and split entries
        # (_emit_split) append to this same chunk through self._chunk.
        gpa_l, len_l, data_l = chunk.gpa, chunk.length, chunk.data
        writes = entry_writes = maps = unmaps = remaps = 0
        for _ in range(updates):
            r = random()
            bound = len(leaves)
            if r < (0.30 if bound > target else 0.45) or bound < 2:
                vpn = 0
                for _try in range(16):  # random_unbound
                    x = getrandbits(k_va)
                    while x >= n_va:
                        x = getrandbits(k_va)
                    if x + 1 not in leaves:
                        vpn = x + 1
                        break
                if vpn:  # map
                    if violation and random() < violation:  # _data_gfn
                        self.stats.bad_gfns += 1
                        gfn = self.bad_gfn_base + self._below(1 << 20)
                    else:
                        x = getrandbits(k_data)
                        while x >= data_pages:
                            x = getrandbits(k_data)
                        gfn = data_base + x
                    # (1, vpn_to_va(vpn) >> _PT_SHIFT), without the large va
                    pt = tables.get((1, _PT_BASE + ((vpn >> 12) << 9) + ((vpn & 4095) >> 9)))
                    if pt is None:
                        pt = self._walk_create(ctx, self.vpn_to_va(vpn))
                    gpa = (pt << PAGE_SHIFT) + ((vpn & (ENTRIES - 1)) << 3)
                    data = ((gfn << PAGE_SHIFT) | _PTE_RW).to_bytes(8, "little")
                    entry_writes += 1
                    if random() < split:
                        self._emit_split(gpa, data)
                    else:
                        gpa_l.append(gpa)
                        len_l.append(8)
                        data_l.append(data)
                        writes += 1
                    used[pt] += 1
                    leaves[vpn] = gfn
                    leaf_pos[vpn] = len(leaf_list)
                    leaf_list.append(vpn)
                    maps += 1
                    continue
            n = len(leaf_list)  # random_bound
            if n <= 1:
                continue
            k = n.bit_length()
            x = getrandbits(k)
            while x >= n:
                x = getrandbits(k)
            vpn = leaf_list[x]
            if vpn == 0:
                continue
            pt = tables[(1, _PT_BASE + ((vpn >> 12) << 9) + ((vpn & 4095) >> 9))]
            if r < 0.70:  # unmap
                gpa = (pt << PAGE_SHIFT) + ((vpn & (ENTRIES - 1)) << 3)
                entry_writes += 1
                if random() < split:
                    self._emit_split(gpa, _ZERO_ENTRY)
                else:
                    gpa_l.append(gpa)
                    len_l.append(8)
                    data_l.append(_ZERO_ENTRY)
                    writes += 1
                used[pt] -= 1
                del leaves[vpn]
                pos = leaf_pos.pop(vpn)
                last = leaf_list.pop()
                if last != vpn:
                    leaf_list[pos] = last
                    leaf_pos[last] = pos
                unmaps += 1
                if not used[pt]:
                    self._release_path(ctx, self.vpn_to_va(vpn))
            else:  # remap
                if violation and random() < violation:  # _data_gfn
                    self.stats.bad_gfns += 1
                    gfn = self.bad_gfn_base + self._below(1 << 20)
                else:
                    x = getrandbits(k_data)
                    while x >= data_pages:
                        x = getrandbits(k_data)
                    gfn = data_base + x
                gpa = (pt << PAGE_SHIFT) + ((vpn & (ENTRIES - 1)) << 3)
                data = ((gfn << PAGE_SHIFT) | _PTE_RW).to_bytes(8, "little")
                entry_writes += 1
                if random() < split:
                    self._emit_split(gpa, data)
                else:
                    gpa_l.append(gpa)
                    len_l.append(8)
                    data_l.append(data)
                    writes += 1
                leaves[vpn] = gfn
                remaps += 1
        stats = self.stats
        stats.writes += writes
        stats.entry_writes += entry_writes
        stats.maps += maps
        stats.unmaps += unmaps
        stats.remaps += remaps
        if created and not chunk.gpa and self._chunk is chunk:
            self._chunk = None  # nothing was written: no empty chunk in the queue

    def evict_table(self, ctx: Context, vpn: int) -> None:
        """Unbind every page in the page table that maps ``vpn`` (a 2 MiB object goes)."""
        first = vpn & ~(ENTRIES - 1)
        for v in range(first, first + ENTRIES):
            if v != 0 and v in ctx.leaves:
                self.unmap(ctx, v)

    def flush(self) -> None:
        """Close the current chunk so everything emitted is in :attr:`queue`."""
        self._close_chunk()
