"""Write docs/kvm-rules.md, the KVM rule matrix, from the rule tests.

Run from the repository root::

    .venv/bin/python tools/gen_kvm_rules.py          # rewrite docs/kvm-rules.md
    .venv/bin/python tools/gen_kvm_rules.py --check  # exit 1 if the file is stale

A test checks rule RX.Y when its name starts ``test_rX_Y_`` (several rules:
``test_r3_1_r3_3_...``); the first sentence of its docstring says how and cites the
kernel function. :data:`RULES` holds what no test can say: each rule's kernel source,
whether pagetrack follows it, and why not where it does not. tests/domain/test_kvm_rules_doc.py
fails when the file is stale, when a rule has no row, or when a modelled rule has no test.
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "kvm-rules.md"
#: the test files whose ``test_rX_Y_`` functions check rules
TEST_FILES = (
    "tests/domain/test_kvm_rules.py",
    "tests/plugins/test_shadow_mmu.py",
    "tests/plugins/test_vgpu.py",
    "tests/cli/test_cli.py",
)

FAITHFUL = "faithful"
DIFFERENT = "deliberate difference"
NOT_MODELLED = "not modelled"

PT = "arch/x86/kvm/mmu/page_track.c"
PT_OLD = "arch/x86/kvm/page_track.c (4.6-6.5)"
MMU = "arch/x86/kvm/mmu/mmu.c"
X86 = "arch/x86/kvm/x86.c"
HDR = "arch/x86/include/asm/kvm_page_track.h"
GTT = "drivers/gpu/drm/i915/gvt/gtt.c"
KVMGT = "drivers/gpu/drm/i915/gvt/kvmgt.c"
GPT = "drivers/gpu/drm/i915/gvt/page_track.c"


@dataclass(frozen=True)
class Rule:
    """One rule: what it says, where the kernel does it, and pagetrack's status."""

    title: str
    source: str
    status: str
    why: str = ""
    #: rules whose tests also check this one (the same behaviour seen from elsewhere)
    see: tuple[str, ...] = ()


RULES: dict[str, Rule] = {
    "R1.1": Rule("one 16-bit counter per 4 KiB gfn, indexed from the slot's base, zeroed",
                 f"{PT} gfn_write_track, __vcalloc", FAITHFUL,
                 "counters are allocated lazily in chunks (same values, less memory)"),
    "R1.2": Rule("write mode only (modes dropped in 6.6; KVMI's PREREAD/PREWRITE never merged)",
                 f"{PT_OLD} enum kvm_page_track_mode", NOT_MODELLED,
                 "only the WRITE mode exists, as since 6.6; other mode numbers are refused"),
    "R1.3": Rule("counter bounds 0..65535: KVM WARNs and leaves the counter unchanged",
                 f"{PT} update_gfn_write_track", DIFFERENT,
                 "an overflow or underflow is refused with an error and changes nothing"),
    "R1.4": Rule("after a refused overflow KVM still bumps the lpage-disallow count [quirk]",
                 f"{PT} __kvm_write_track_add_gfn", DIFFERENT,
                 "the quirk is not copied: a refused add touches nothing"),
    "R1.5": Rule("tracked iff counter != 0; false without a slot",
                 f"{PT} kvm_gfn_is_write_tracked", FAITHFUL),
    "R1.6": Rule("write tracking enabled lazily (KVMGT built, TDP off, or a shadow root)",
                 f"{PT} kvm_page_track_write_tracking_enabled", DIFFERENT,
                 "tracking is always enabled"),
    "R1.7": Rule("add/remove while tracking is disabled bugs the VM",
                 f"{PT} KVM_BUG_ON", DIFFERENT,
                 "tracking is always enabled, so the case cannot arise"),
    "R2.1": Rule("before 6.6 callers locked and looked up the slot themselves",
                 f"{PT_OLD} kvm_slot_page_track_add_page", NOT_MODELLED,
                 "one API, the 6.6 one (R2.2); locking is moot on one event loop"),
    "R2.2": Rule("6.6+ external API: add/remove by gfn, slot looked up inside",
                 f"{PT} kvm_write_track_add_gfn, kvm_write_track_remove_gfn", FAITHFUL),
    "R2.3": Rule("gfn without a memslot: -EINVAL, nothing changes; no per-caller ownership",
                 f"{PT} kvm_write_track_add_gfn", FAITHFUL,
                 "pagetrack also records an owner per reference (README differences)"),
    "R2.4": Rule("refcounted: N adds need N removes; remove at 0 WARNs, returns 0",
                 f"{PT} __kvm_write_track_remove_gfn", DIFFERENT,
                 "a remove the owner does not hold is refused (NotTracked) instead of a WARN"),
    "R2.5": Rule("external API only with CONFIG_KVM_EXTERNAL_WRITE_TRACKING",
                 "arch/x86/kvm/mmu/page_track.h", NOT_MODELLED,
                 "a build option; the simulator always has the API"),
    "R3.1": Rule("add: counter+1, lpage disallow at 2M/1G, every SPTE mapping the gfn "
                 "write-protected (the MMU hears every user's 0 -> 1)",
                 f"{PT} __kvm_write_track_add_gfn; {MMU} kvm_mmu_gfn_disallow_lpage, "
                 "kvm_mmu_slot_gfn_write_protect", FAITHFUL),
    "R3.2": Rule("remove: counter-1, lpage allow; SPTEs stay read-only until the next fault",
                 f"{PT} __kvm_write_track_remove_gfn", FAITHFUL),
    "R3.3": Rule("no writable SPTE while the counter is > 0",
                 f"{MMU} mmu_try_to_unsync_pages", FAITHFUL),
    "R3.4": Rule("internal and external users share one counter",
                 f"{PT}; {MMU} account_shadowed", FAITHFUL),
    "R3.5": Rule("a slot covering part of a 2M/1G region disallows huge pages there from "
                 "creation, tracked or not",
                 f"{X86} kvm_alloc_memslot_metadata", FAITHFUL,
                 "the host-address alignment part does not apply (no host addresses)"),
    "R4.1": Rule("only a present write fault on a tracked gfn is emulated; reads map normally",
                 f"{MMU} page_fault_handle_page_track", FAITHFUL),
    "R4.2": Rule("a not-present write fault on a tracked gfn is emulated too",
                 f"{MMU} page_fault_handle_page_track", FAITHFUL),
    "R4.3": Rule("a write crossing pages is split into one-page pieces; once it traps, every "
                 "piece that reaches RAM is notified",
                 f"{X86} emulator_read_write, emulator_read_write_onepage", FAITHFUL,
                 "events on untracked pages carry the `untracked` flag (an addition)"),
    "R4.4": Rule("the write is committed first, then notified",
                 f"{X86} emulator_write_phys", FAITHFUL),
    "R4.5": Rule("emulated CMPXCHG: dirty either way, notified only when it exchanges",
                 f"{X86} emulator_cmpxchg_emulated", FAITHFUL),
    "R4.6": Rule("notification is not filtered by tracked state; notifiers decide",
                 f"{PT} __kvm_page_track_write", FAITHFUL),
    "R4.7": Rule("host, userspace and DMA writes never notify",
                 f"{X86}; {PT}", FAITHFUL,
                 "dma_policy notify/reject are extensions (docs/dma-debate.md); bypass is KVM"),
    "R4.8": Rule("external notifiers newest first, then the shadow MMU",
                 "arch/x86/kvm/mmu/page_track.h kvm_page_track_write", FAITHFUL,
                 "event history and Watch streams (pagetrack's own) are told before plugins"),
    "R4.9": Rule("track_write gets (gpa, new bytes, length)",
                 HDR, FAITHFUL, "events also carry seq, vcpu and source"),
    "R4.10": Rule("unprotect-and-retry with a loop guard; only if something was zapped",
                  f"{MMU} kvm_mmu_unprotect_page; {X86} retry_instruction", FAITHFUL),
    "R5.1": Rule("register inserts at the list head",
                 f"{PT} kvm_page_track_register_notifier", FAITHFUL),
    "R5.2": Rule("after unregister returns the node is never called again",
                 f"{PT} kvm_page_track_unregister_notifier (synchronize_srcu)", FAITHFUL),
    "R5.3": Rule("dispatch walks a snapshot; a node registered mid-dispatch is called at most "
                 "once", f"{PT} __kvm_page_track_write", FAITHFUL),
    "R5.4": Rule("hooks: track_write and track_remove_region (6.6) / track_flush_slot (old)",
                 HDR, FAITHFUL),
    "R5.5": Rule("2016: track_flush_slot before the memslot change is committed",
                 f"{X86} kvm_arch_flush_shadow_memslot", FAITHFUL, "semantics = 2016"),
    "R5.6": Rule("6.6: track_remove_region after DELETE commits, only for DELETE",
                 f"{X86} kvm_arch_commit_memory_region", FAITHFUL, "semantics = linux-6.6"),
    "R6.1": Rule("CREATE: zeroed counters, no notifier called",
                 f"{X86} kvm_arch_prepare_memory_region", FAITHFUL),
    "R6.2": Rule("FLAGS_ONLY keeps the counters", f"{X86} kvm_arch_prepare_memory_region",
                 FAITHFUL),
    "R6.3": Rule("MOVE: refused with an external notifier (6.6), else counters lost",
                 f"{X86} kvm_arch_prepare_memory_region", FAITHFUL,
                 "semantics = 2016 moves the counters with the slot (the seed series' v2)"),
    "R6.4": Rule("DELETE: notifiers hear of the range, counters freed", X86, FAITHFUL),
    "R6.5": Rule("a re-created slot starts at zero", X86, FAITHFUL),
    "R6.6": Rule("has_external_user is !hlist_empty (an early revision inverted it)",
                 f"{PT} kvm_page_track_has_external_user", FAITHFUL),
    "R7.1": Rule("account_shadowed: a shadow page takes a reference on its guest table",
                 f"{MMU} account_shadowed", DIFFERENT,
                 "leaf tables hold a counter reference too (unsync pages are not modelled)"),
    "R7.2": Rule("kvm_mmu_track_write: re-read the gpte, zap the written SPTE or the page",
                 f"{MMU} kvm_mmu_track_write, mmu_pte_write_fetch_gpte", FAITHFUL,
                 "a 4-byte write straddling two gptes is not widened (KVM leaves one stale)"),
    "R7.3": Rule("detect_write_misaligned", f"{MMU} detect_write_misaligned", FAITHFUL),
    "R7.4": Rule("detect_write_flooding: the 3rd write without a use zaps; leaves exempt",
                 f"{MMU} detect_write_flooding", FAITHFUL, "threshold is an option"),
    "R7.5": Rule("get_written_sptes: one SPTE per 8-byte gpte", f"{MMU} get_written_sptes",
                 FAITHFUL, "64-bit guest tables only: no 32-bit quadrants", see=("R7.2",)),
    "R7.6": Rule("kvm_mmu_unprotect_page zaps every shadow page of the gfn",
                 f"{MMU} kvm_mmu_unprotect_page", FAITHFUL),
    "R8.1": Rule("one vGPU per VM (-EEXIST); detach unregisters then drops references",
                 f"{KVMGT} intel_vgpu_open_device", FAITHFUL),
    "R8.2": Rule("protect table: one reference per gfn per vGPU",
                 f"{KVMGT} intel_gvt_page_track_add", FAITHFUL),
    "R8.3": Rule("GVT page-track layer: gfn -> handler, enable/disable",
                 f"{GPT} intel_vgpu_register_page_track", FAITHFUL),
    "R8.4": Rule("write handler chain: only protected gfns; errors logged, not returned",
                 f"{KVMGT} kvmgt_page_track_write", FAITHFUL),
    "R8.5": Rule("only 4/8-byte writes; the entry is re-read from guest memory",
                 f"{GTT} ppgtt_write_protection_handler", FAITHFUL,
                 "64K entries are not modelled"),
    "R8.6": Rule("an 8-byte write re-shadows at once", f"{GTT} ppgtt_handle_guest_write_page_table",
                 FAITHFUL),
    "R8.7": Rule("a 4-byte half goes to scratch, pending until the flush before submission",
                 f"{GTT} ppgtt_set_post_shadow, intel_vgpu_flush_post_shadow", FAITHFUL,
                 "partial=halves (an option) settles it once both halves are written"),
    "R8.8": Rule("out-of-sync pages (module option, default off)",
                 f"{GTT} enable_out_of_sync", NOT_MODELLED, "off by default in the kernel too"),
    "R8.9": Rule("shadowing a child table outside every memslot fails",
                 f"{GTT} ppgtt_populate_spt_by_guest_entry", FAITHFUL,
                 "missing_table=scratch (an option) maps the scratch table instead"),
    "R8.10": Rule("remove_region forgets the range from the protect table, no KVM remove",
                  f"{KVMGT} kvmgt_page_track_remove_region", FAITHFUL),
    "R8.11": Rule("vgpu_lock held across the handler; add/remove must not retake it",
                  KVMGT, NOT_MODELLED, "one event loop, no locks: the deadlock cannot arise"),
    "R9.1": Rule("use-after-free: table lookups raced with remove", KVMGT, NOT_MODELLED,
                 "one event loop: no concurrent remove"),
    "R9.2": Rule("flush_slot ran before the change was certain; replaced by remove_region",
                 X86, FAITHFUL, "both orders, by semantics", see=("R5.5", "R5.6")),
    "R9.3": Rule("MOVE with KVMGT attached was never right, so 6.6 refuses it",
                 X86, FAITHFUL, see=("R6.3",)),
    "R9.4": Rule("unregister must wait for in-flight callbacks", PT, FAITHFUL, see=("R5.2",)),
    "R9.5": Rule("barrier between indirect_shadow_pages++ and the gpte re-read", MMU,
                 NOT_MODELLED, "one event loop: no concurrent fault and write"),
    "R9.6": Rule("refcount vs per-user dedupe: a user cannot drop another's references",
                 PT, DIFFERENT, "references have owners, so the leak/underflow is refused"),
}

_NAME = re.compile(r"^test_((?:r\d+_\d+_)+)")


def rule_key(rule: str) -> tuple[int, int]:
    major, minor = rule[1:].split(".")
    return int(major), int(minor)


def _first_sentence(doc: str) -> str:
    text = " ".join(doc.split())
    end = re.search(r"(?<=[.)])\s(?=[A-Z])", text)
    return text[: end.start()] if end else text


def collect(root: Path = ROOT) -> dict[str, list[tuple[str, str]]]:
    """Rule id -> [(test id, first sentence of its docstring)], in file order."""
    found: dict[str, list[tuple[str, str]]] = {}
    for rel in TEST_FILES:
        tree = ast.parse((root / rel).read_text())
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            m = _NAME.match(node.name)
            if m is None:
                continue
            rules = [f"R{a}.{b}" for a, b in re.findall(r"r(\d+)_(\d+)_", m.group(1))]
            doc = _first_sentence(ast.get_docstring(node) or "")
            for rule in rules:
                found.setdefault(rule, []).append((f"{rel}::{node.name}", doc))
    return found


def problems(found: dict[str, list[tuple[str, str]]]) -> list[str]:
    """Rules named by tests but missing from RULES, and modelled rules with no test."""
    out = [f"{r}: tested but has no entry in RULES" for r in sorted(set(found) - set(RULES))]
    for rule_id, rule in RULES.items():
        tested = found.get(rule_id) or [t for s in rule.see for t in found.get(s, [])]
        if rule.status != NOT_MODELLED and not tested:
            out.append(f"{rule_id}: {rule.status} but no test checks it")
    return out


def render(found: dict[str, list[tuple[str, str]]]) -> str:
    """The matrix as Markdown."""
    lines = [
        "# KVM rules: the matrix",
        "",
        "<!-- GENERATED by tools/gen_kvm_rules.py from the rule tests; do not edit. -->",
        "",
        "Every rule of Linux KVM's x86 page-track facility (and of its two in-kernel users,",
        "the shadow MMU and KVMGT) that pagetrack reproduces, with the kernel source it comes",
        "from (paths in torvalds/linux), whether pagetrack follows it, and the tests that check",
        "it. A test named `test_rX_Y_...` checks rule RX.Y; the text next to it is the first",
        "sentence of its docstring. Status: *faithful* (as the kernel does it; a note names",
        "what pagetrack adds), *deliberate difference* (and why), *not modelled* (and why).",
        "`make mutate` (tools/mutate.py) breaks each modelled rule on purpose, one change at a",
        "time, and requires these tests to fail on every breakage.",
        "",
        "| Rule | What | Kernel source | Status | Tests |",
        "|---|---|---|---|---|",
    ]
    for rule_id in sorted(RULES, key=rule_key):
        rule = RULES[rule_id]
        status = rule.status + (f": {rule.why}" if rule.why else "")
        tests = [f"`{t.split('::')[1]}`" for t, _ in found.get(rule_id, [])]
        if rule.see:
            tests.append("and the tests of " + ", ".join(rule.see))
        cell = "<br>".join(tests) if tests else "none"
        lines.append(
            f"| {rule_id} | {rule.title} | `{rule.source}` | {status} | {cell} |"
        )
    lines += [
        "",
        "## The tests, by rule",
        "",
    ]
    for rule_id in sorted(found, key=rule_key):
        lines.append(f"### {rule_id}")
        lines.append("")
        for test, doc in found[rule_id]:
            lines.append(f"- `{test}`: {doc}")
        lines.append("")
    lines += [
        "## The cost model's numbers",
        "",
        "Not rules, but figures the simulator reports (`server/pagetrackd/domain/cost.py`):",
        "`mmio_exit_cycles = 5000` is quoted from the 2016 page-track thread (a write that",
        "exits to user space); `emulate_cycles = 1500` is an assumption with no measurement",
        "behind it; `host_hz = 3.3e9` is an assumed core clock chosen so that 5000 cycles at",
        "100k writes/s come to the thread's ~15% of a CPU.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    found = collect()
    bad = problems(found)
    if bad:
        print("\n".join(bad), file=sys.stderr)
        return 1
    text = render(found)
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT.relative_to(ROOT)} is stale: run tools/gen_kvm_rules.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}: {len(RULES)} rules")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
