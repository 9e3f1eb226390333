"""Mutation check of the KVM rule tests: break each modelled rule on purpose, one at a
time, and require the domain and plugin tests to notice.

Run from the repository root (``make mutate``; not part of ``make test``)::

    .venv/bin/python tools/mutate.py            # every mutant, 2 at a time
    .venv/bin/python tools/mutate.py R4.3 R8.7  # only the mutants of these rules
    .venv/bin/python tools/mutate.py --list

Each mutant is a textual change to ``server/`` (every ``old`` must occur exactly once in
its file). It is applied to a copy of ``server/`` in a temporary directory, and pytest
runs with that copy first on PYTHONPATH: first the mutant's own tests (fast), then, if
they all pass, the whole of tests/domain and tests/plugins, stopping at the first
failure. A mutant is *killed* when a test fails (or the run times out), a *survivor*
otherwise. Prints one line per mutant, then ``mutants: K killed of N`` and the
survivors; exits 1 if any survived or a mutant no longer applies.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTEST = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"]
EVERYTHING = ("tests/domain", "tests/plugins")
TIMEOUT_S = 600

TRACK = "pagetrackd/domain/track.py"
TRACKING = "pagetrackd/domain/tracking.py"
GUEST = "pagetrackd/domain/guest.py"
BATCH = "pagetrackd/domain/batch.py"
MEMSLOT_OPS = "pagetrackd/domain/memslot_ops.py"
COUNTERS = "pagetrackd/domain/counters.py"
REGIONS = "pagetrackd/domain/regions.py"
EVENTS = "pagetrackd/domain/events.py"
NOTIFIERS = "pagetrackd/domain/notifiers.py"
MMU = "pagetrackd/plugins/shadow_mmu.py"
MMU_TABLE = "pagetrackd/plugins/shadow_table.py"
MMU_FAULTS = "pagetrackd/plugins/shadow_faults.py"
MMU_AUDIT = "pagetrackd/plugins/shadow_audit.py"
MMU_PAGES = "pagetrackd/plugins/shadow_pages.py"
VGPU = "pagetrackd/plugins/vgpu.py"
VGPU_SHADOW = "pagetrackd/plugins/vgpu_shadow.py"

RULES_T = "tests/domain/test_kvm_rules.py"
EQUIV_T = "tests/domain/test_batch_equivalence.py"
MMU_T = "tests/plugins/test_shadow_mmu.py"
VGPU_T = "tests/plugins/test_vgpu.py"


@dataclass(frozen=True)
class Mutant:
    """A deliberate breakage of one rule: (old, new) replacements in one file."""

    rule: str
    what: str
    file: str
    edits: tuple[tuple[str, str], ...]
    tests: tuple[str, ...] = (RULES_T,)


def m(rule: str, what: str, file: str, old: str, new: str, *tests: str) -> Mutant:
    return Mutant(rule, what, file, ((old, new),), tests or (RULES_T,))


MUTANTS: list[Mutant] = [
    # -- R1: counters
    m("R1.1", "counters are 8-bit", COUNTERS,
      "grown = np.zeros((cap, CHUNK), dtype=np.uint16)",
      "grown = np.zeros((cap, CHUNK), dtype=np.uint8)"),
    m("R1.1", "index from the slot base off by one", TRACKING,
      "idx, counts = np.unique(gfns[pos == p] - slot.base_gfn, return_counts=True)",
      "idx, counts = np.unique(gfns[pos == p] - slot.base_gfn + 1, return_counts=True)"),
    m("R1.3", "overflow past 65535 let through", TRACKING,
      "            if top <= COUNTER_MAX:\n", "            if top <= COUNTER_MAX + 1:\n"),
    m("R1.4", "a refused overflow still bumps the lpage count (KVM's quirk)", TRACKING,
      "            if tracking.counters.get1(i1) + 1 > COUNTER_MAX:\n",
      "            if tracking.counters.get1(i1) + 1 > COUNTER_MAX:\n"
      "                tracking._count_lpages(np.array([i1]), +1)\n"),
    m("R1.5", "a gfn with counter 0 counts as tracked", TRACKING,
      "return slot is not None and slot.tracking.counters.get1(gfn - slot.base_gfn) > 0",
      "return slot is not None and slot.tracking.counters.get1(gfn - slot.base_gfn) >= 0"),
    m("R1.6", "tracking enabled only once a notifier exists", TRACKING,
      "        self.check_owner(owner)\n        one = self._single_gfn(gfns)\n"
      "        if one is not None:\n            tracking, i1 = one[0].tracking, one[1]\n"
      "            if tracking.counters.get1(i1) + 1",
      "        self.check_owner(owner)\n        if not len(self.notifiers):\n"
      "            raise FailedPrecondition('write tracking is not enabled')\n"
      "        one = self._single_gfn(gfns)\n"
      "        if one is not None:\n            tracking, i1 = one[0].tracking, one[1]\n"
      "            if tracking.counters.get1(i1) + 1"),
    m("R1.7", "writes to tracked gfns go native without a notifier", GUEST,
      "if untracked and not trapped:",
      "if (untracked or not len(self.notifiers)) and not trapped:"),
    # -- R2: API
    m("R2.2", "every gfn goes to the first slot", TRACKING,
      "            slot = slots[p]\n            idx, counts = np.unique(",
      "            slot = slots[0]\n            idx, counts = np.unique("),
    m("R2.3", "a single gfn outside the memslots is not refused", TRACKING,
      "        if outside.size:\n            g = int(gfns[outside[0]])",
      "        if outside.size > 1:\n            g = int(gfns[outside[0]])"),
    m("R2.4", "a remove at 0 is let through", TRACKING,
      "            if held1 < 1:", "            if held1 < 0:"),
    m("R2.4", "a batch may remove more than it holds", TRACKING,
      "short = np.flatnonzero(held < cnt)", "short = np.flatnonzero(held < cnt - 1)"),
    # -- R3: MMU effects
    m("R3.1", "the MMU is not told of another user's 0 -> 1", TRACKING,
      "if started1 and self.track_start_hooks:", "if False:", MMU_T),
    m("R3.1", "the MMU is not told of 0 -> 1 in a multi-gfn add", TRACKING,
      "        if new:\n            self._tracking_started(new)", "        pass", MMU_T, RULES_T),
    m("R3.1", "write protection leaves W set", MMU_TABLE,
      "                    sp.sptes[idx] &= ~PTE_RW\n", "                    pass\n", MMU_T),
    m("R3.1", "no lpage disallow on the first reference", TRACK,
      "            step = 1 if started else -1\n", "            step = 0 if started else -1\n"),
    m("R3.2", "the last remove keeps huge pages disallowed", TRACK,
      "            step = 1 if started else -1\n", "            step = 1 if started else 0\n"),
    m("R3.3", "the fault path installs writable SPTEs on tracked gfns", MMU_FAULTS,
      "if writable and level == 1 and self.vm.is_tracked(gfn):", "if False:", MMU_T),
    m("R3.3", "the audit ignores the counters", MMU_AUDIT,
      "if self._any_tracked(gfn, span):", "if False:", MMU_T),
    m("R3.3", "a tracked gfn is written natively", GUEST,
      "untracked = not slot.tracking.counters.get1(index)\n",
      "untracked = slot.tracking.counters.get1(index) < 2\n"),
    m("R3.4", "plugin references are not told apart from the tenant's", TRACK,
      "            self.attributed.add(one, delta)\n", "            pass\n"),
    m("R3.5", "no huge-page disallow at an unaligned slot start", REGIONS,
      "        if base_gfn & (size - 1):\n            edge.add(0)",
      "        if False:\n            edge.add(0)"),
    m("R3.5", "no huge-page disallow at an unaligned slot end", REGIONS,
      "        if (base_gfn + npages) & (size - 1):", "        if False:"),
    # -- R4: write path
    m("R4.1", "read faults on tracked gfns marked emulated", MMU_FAULTS,
      "emulated = write and self.vm.is_tracked(gw.gfn)",
      "emulated = self.vm.is_tracked(gw.gfn)"),
    m("R4.2", "batched writes to a tracked gfn (count 1) go native", BATCH,
      "        path = (slot.tracking.counters.get(index) > 0).astype(np.int8)"
      " + np.int8(_FAST)\n        return path, pos, index",
      "        path = (slot.tracking.counters.get(index) > 1).astype(np.int8)"
      " + np.int8(_FAST)\n        return path, pos, index",
      RULES_T, EQUIV_T),
    m("R4.3", "a crossing write is never emulated whole", GUEST,
      "                trapped = (\n", "                trapped = False and (\n"),
    m("R4.3", "the batch path does not emulate crossing writes whole", BATCH,
      "promote = fast & trapped[widx]", "promote = fast & False", RULES_T, EQUIV_T),
    m("R4.3", "a write is not split at page boundaries", GUEST,
      "            plen = min(PAGE_SIZE - (g & PAGE_MASK), n - off)\n            spans.append",
      "            plen = n - off\n            spans.append"),
    m("R4.3", "a batch forgets the write in progress when it classifies again", BATCH,
      "if pc.multi[i] == pc.multi[j]:", "if False:",
      EQUIV_T, RULES_T),
    m("R4.4", "the write lands after the notification", GUEST,
      "        index = gfn - slot.info.base_gfn\n        slot.memory.write(index, gpa & PAGE_MASK,"
      " data)\n        stats = self.stats\n",
      "        index = gfn - slot.info.base_gfn\n        stats = self.stats\n"),
    m("R4.5", "a failed CMPXCHG is notified", GUEST,
      "exchanged = current == expected", "exchanged = True"),
    m("R4.5", "a failed CMPXCHG does not dirty the page", GUEST,
      "        if slot.dirty is not None:\n            slot.dirty.add(index)\n"
      "        exchanged = current == expected",
      "        exchanged = current == expected"),
    m("R4.6", "dispatch filtered by tracked state", NOTIFIERS,
      "        calls = 0\n        for node in nodes:",
      "        calls = 0\n        if not vm.is_tracked(event.gpa >> 12):\n            return 0\n"
      "        for node in nodes:"),
    m("R4.6", "the batch path skips events on untracked pages", NOTIFIERS,
      "        if flags:\n            self._calls += self._list._tell(nodes, vm, guest_event(",
      "        if flags:\n            return\n"
      "            self._calls += self._list._tell(nodes, vm, guest_event("),
    m("R4.7", "bypassed DMA is notified", GUEST,
      "if policy is DmaPolicy.NOTIFY and tracked:", "if tracked:"),
    m("R4.8", "the shadow MMU runs in attach order", NOTIFIERS,
      "self.sync = tuple(n for n in self._nodes if not n.batch and n.notifier.external) + tuple(\n"
      "            n for n in self._nodes if not n.batch and not n.notifier.external\n        )",
      "self.sync = tuple(n for n in self._nodes if not n.batch)", MMU_T, RULES_T),
    m("R4.9", "the event's gpa loses its page offset", EVENTS,
      "    _ev_gpa(e, gpa)\n", "    _ev_gpa(e, gpa & ~0xFFF)\n"),
    m("R4.10", "no loop guard on unprotect-and-retry", MMU_FAULTS,
      "if vc.last_retry == (rip, addr):", "if False:", MMU_T),
    m("R4.10", "retry although nothing was zapped", MMU_FAULTS,
      "retry = zapped > 0", "retry = True", MMU_T),
    # -- R5: notifier lifetime
    m("R5.1", "registration appends at the tail", NOTIFIERS,
      "self._nodes = [node, *self._nodes]", "self._nodes = [*self._nodes, node]"),
    m("R5.2", "an unregistered node stays active", NOTIFIERS,
      "        node.active = False\n", "        pass\n"),
    m("R5.3", "a node registered during a dispatch is called by it", NOTIFIERS,
      "        return self._tell(self.batch, vm, event) + self._tell(self.sync, vm, event)",
      "        n = self._tell(self.batch, vm, event) + self._tell(self.sync, vm, event)\n"
      "        return n + self._tell([x for x in self.sync if x.calls == 0], vm, event)"),
    m("R5.3", "no seq for emulated writes without notifiers", GUEST,
      "        self.seq = seq = self.seq + 1\n        notifiers = self.notifiers\n"
      "        if notifiers.sync or notifiers.batch:  # any node registered\n",
      "        seq = self.seq + 1\n        notifiers = self.notifiers\n"
      "        if notifiers.sync or notifiers.batch:  # any node registered\n"
      "            self.seq = seq\n"),
    m("R5.4", "track_remove_region gets a short range", NOTIFIERS,
      "node.notifier.track_remove_region(vm, base_gfn, npages)",
      "node.notifier.track_remove_region(vm, base_gfn, npages - 1)"),
    m("R5.5", "2016: flush_slot after the slot is gone (also R9.2)", MEMSLOT_OPS,
      "            self._region_gone(info, SlotChange.DELETE)\n"
      "            del self.slots.by_id[info.slot_id]\n            self.slots.reindex()\n",
      "            del self.slots.by_id[info.slot_id]\n            self.slots.reindex()\n"
      "            self._region_gone(info, SlotChange.DELETE)\n"),
    m("R5.6", "6.6: remove_region before the slot is gone (also R9.2)", MEMSLOT_OPS,
      "            del self.slots.by_id[info.slot_id]\n            self.slots.reindex()\n"
      "            self._region_gone(info, SlotChange.DELETE)\n        self.stats",
      "            self._region_gone(info, SlotChange.DELETE)\n"
      "            del self.slots.by_id[info.slot_id]\n            self.slots.reindex()\n"
      "        self.stats"),
    # -- R6: memslot changes
    m("R6.1", "CREATE calls the notifiers", MEMSLOT_OPS,
      "            self.slots.by_id[slot_id] = Slot(new)\n            self.slots.reindex()\n",
      "            self.slots.by_id[slot_id] = Slot(new)\n            self.slots.reindex()\n"
      "            self.notifiers.dispatch_remove_region(self, base_gfn, npages)\n"),
    m("R6.2", "FLAGS_ONLY drops the counters", MEMSLOT_OPS,
      "        old.info = new\n",
      "        old.info = new\n        old.tracking.__init__(new.npages, new.base_gfn)\n"),
    m("R6.3", "6.6 MOVE allowed with an external notifier (also R9.3)", MEMSLOT_OPS,
      "            if self.notifiers.has_external:", "            if False:"),
    m("R6.3", "2016 MOVE does not recount huge-page regions (also R9.3)", MEMSLOT_OPS,
      "            slot.tracking.rebase(new.base_gfn)\n", "            pass\n"),
    m("R6.3", "6.6 MOVE keeps the counters", MEMSLOT_OPS,
      "            moved = Slot(new, memory)\n",
      "            moved = Slot(new, memory)\n            moved.tracking = slot.tracking\n"),
    m("R6.4", "6.6 DELETE tells no notifier", MEMSLOT_OPS,
      "            self._region_gone(info, SlotChange.DELETE)\n        self.stats",
      "            pass\n        self.stats"),
    Mutant("R6.5", "a re-created slot gets its old counters back", MEMSLOT_OPS, (
        ("    def _delete_slot(self, slot: Slot) -> None:\n        info = slot.info\n",
         "    def _delete_slot(self, slot: Slot) -> None:\n        info = slot.info\n"
         "        self.__dict__.setdefault('_dead', {})[info.slot_id] = slot\n"),
        ("            self.slots.by_id[slot_id] = Slot(new)\n",
         "            self.slots.by_id[slot_id] = (\n"
         "                self.__dict__.get('_dead', {}).pop(slot_id, None) or Slot(new)\n"
         "            )\n"),
    )),
    m("R6.6", "has_external_user inverted", NOTIFIERS,
      "return any(n.notifier.external for n in self._nodes)",
      "return not any(n.notifier.external for n in self._nodes)"),
    # -- R7: shadow MMU
    m("R7.1", "account_shadowed takes no reference", MMU_TABLE,
      "            self.vm.track_add([gfn], owner=OWNER)\n", "            pass\n", MMU_T),
    m("R7.2", "a 4-byte write is not widened to its gpte", MMU,
      "if nbytes == 4 and (gpa & 7) <= 4:", "if False:", MMU_T),
    m("R7.3", "short writes are not misaligned", MMU_PAGES,
      "or nbytes < 4", "or nbytes < 2", MMU_T),
    m("R7.4", "flooding one write later", MMU,
      "return sp.flood >= self.flood_threshold", "return sp.flood > self.flood_threshold",
      MMU_T),
    m("R7.4", "leaf pages flood too", MMU,
      "if sp.level == 1 and not self.flood_leaf:", "if False:", MMU_T),
    m("R7.4", "a lookup does not reset the flood count", MMU_TABLE,
      "        if sp is not None:\n            sp.flood = 0\n            return sp",
      "        if sp is not None:\n            return sp", MMU_T),
    m("R7.5", "the wrong SPTE is zapped", MMU,
      "if self._drop_spte(sp, (gpa & 0xFFF) // ENTRY_BYTES):",
      "if self._drop_spte(sp, (gpa & 0xFFF) // ENTRY_BYTES + 1):", MMU_T),
    m("R7.6", "unprotect zaps nothing", MMU_FAULTS,
      "        for sp in list(self._by_gfn.get(gfn, ())):\n"
      "            self._zap_sp(sp, \"unprotected\")",
      "        for sp in list(self._by_gfn.get(gfn, ()))[:0]:\n"
      "            self._zap_sp(sp, \"unprotected\")", MMU_T),
    # -- R8: vGPU
    m("R8.1", "a second vGPU on one VM is accepted", VGPU,
      "            if isinstance(node.notifier, Vgpu):\n                raise AlreadyExists(",
      "            if False:\n                raise AlreadyExists(", VGPU_T),
    m("R8.1", "detach keeps the references", VGPU,
      "        if not vm.closed:\n            vm.release_owner(OWNER)",
      "        if False:\n            vm.release_owner(OWNER)", VGPU_T),
    m("R8.2", "a protected gfn is added twice", VGPU_SHADOW,
      "        if gfn in self._protect:\n            return\n        self._vm().track_add",
      "        self._vm().track_add", VGPU_T),
    m("R8.3", "disabling a page track leaves the gfn tracked", VGPU_SHADOW,
      "        if track is not None and track.tracked:\n            self._protect_remove(gfn)",
      "        if False:\n            self._protect_remove(gfn)", VGPU_T),
    m("R8.4", "writes to unprotected gfns are handled", VGPU,
      "        if gfn not in self._protect:\n            stats.foreign_writes += 1\n"
      "            return\n",
      "        if False:\n            stats.foreign_writes += 1\n            return\n", VGPU_T),
    m("R8.5", "writes of other sizes are handled", VGPU_SHADOW,
      "if nbytes != 4 and nbytes != 8:", "if nbytes == 0:", VGPU_T),
    m("R8.6", "an 8-byte write keeps the old shadow entry's mapping", VGPU_SHADOW,
      "            self._handle_guest_write(spt, index, ge)\n            return\n"
      "        stats.partial_writes",
      "            return\n        stats.partial_writes", VGPU_T),
    m("R8.7", "partial entries settle at the second half by default", VGPU_SHADOW,
      "if self.partial == \"halves\" and spt.post[index] == 3:", "if spt.post[index] == 3:",
      VGPU_T),
    m("R8.7", "a partial write keeps the old shadow entry", VGPU_SHADOW,
      "            spt.entries[index] = (old & FLAGS_MASK) | self._scratch_entry(spt.level)\n",
      "            pass\n", VGPU_T),
    m("R8.9", "a child table outside the memslots maps scratch by default", VGPU_SHADOW,
      "            if self.missing_table == \"fail\":\n                raise ShadowFailed(gfn)",
      "            if False:\n                raise ShadowFailed(gfn)", VGPU_T),
    m("R8.10", "remove_region removes KVM tracking", VGPU,
      "        self._protect.difference_update(gone)",
      "        for g in gone:\n            self._protect_remove(g)", VGPU_T),
    # -- R9: pitfalls
    Mutant("R9.6", "the tenant may drop references others hold", TRACK, (
        ("            return self.counters.get1(index) - self.attributed.get1(index)",
         "            return self.counters.get1(index)"),
    )),
]


@dataclass
class Outcome:
    mutant: Mutant
    killed: bool
    how: str
    seconds: float


def _apply(mutant: Mutant, server: Path) -> None:
    path = server / mutant.file
    text = path.read_text()
    for old, new in mutant.edits:
        n = text.count(old)
        if n != 1:
            raise LookupError(f"{mutant.rule} {mutant.what!r}: {n} matches in {mutant.file}")
        text = text.replace(old, new)
    path.write_text(text)


def _pytest(paths: tuple[str, ...], server: Path) -> tuple[int, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(server), str(ROOT / "client"), str(ROOT)])
    try:
        res = subprocess.run(
            [*PYTEST, *paths], cwd=ROOT, env=env, capture_output=True, text=True,
            timeout=TIMEOUT_S, check=False,
        )
    except subprocess.TimeoutExpired:
        return 1, "timed out"
    lines = [x for x in res.stdout.splitlines() if x.startswith("FAILED") or "Error" in x]
    return res.returncode, (lines[0] if lines else res.stdout.strip().splitlines()[-1:] or [""])[0]


def run_one(mutant: Mutant) -> Outcome:
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mutant-") as tmp:
        server = Path(tmp) / "server"
        shutil.copytree(ROOT / "server", server, ignore=shutil.ignore_patterns("__pycache__"))
        _apply(mutant, server)
        for paths in (mutant.tests, EVERYTHING):
            code, how = _pytest(paths, server)
            if code != 0:
                return Outcome(mutant, True, how, time.monotonic() - t0)
        return Outcome(mutant, False, "every test passed", time.monotonic() - t0)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("rules", nargs="*", help="only the mutants of these rules (e.g. R4.3)")
    parser.add_argument("-j", "--jobs", type=int, default=2, help="mutants run at once")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args(argv)
    chosen = [x for x in MUTANTS if not args.rules or x.rule in args.rules]
    if args.list:
        for x in chosen:
            print(f"{x.rule:6} {x.file:34} {x.what}")
        print(f"{len(chosen)} mutants over {len({x.rule for x in chosen})} rules")
        return 0
    for x in chosen:  # fail fast on a mutant that no longer applies
        _apply_check(x)
    t0 = time.monotonic()
    outcomes: list[Outcome] = []
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for out in pool.map(run_one, chosen):
            outcomes.append(out)
            mark = "killed  " if out.killed else "SURVIVED"
            print(f"{mark} {out.mutant.rule:6} {out.mutant.what} ({out.seconds:.0f} s)"
                  f"{'' if out.killed else ''}", flush=True)
    killed = sum(o.killed for o in outcomes)
    print(f"mutants: {killed} killed of {len(outcomes)}"
          f" ({len({o.mutant.rule for o in outcomes})} rules, {time.monotonic() - t0:.0f} s)")
    survivors = [o for o in outcomes if not o.killed]
    for o in survivors:
        print(f"survivor: {o.mutant.rule} {o.mutant.what} ({o.mutant.file})")
    return 1 if survivors else 0


def _apply_check(mutant: Mutant) -> None:
    text = (ROOT / "server" / mutant.file).read_text()
    for old, _ in mutant.edits:
        n = text.count(old)
        if n != 1:
            raise SystemExit(f"{mutant.rule} {mutant.what!r}: {n} matches in {mutant.file}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
