"""The workload protocol: simulated vCPUs that drive a VM deterministically.

A workload is made from a seed and options, sets the VM up once (memslots, tracking,
plugins it needs), then performs guest activity in steps. The daemon's runner calls
``step`` repeatedly to reach a target rate; the same seed and options always give the
same sequence of writes and events, whatever the step sizes.
"""

from __future__ import annotations

from typing import Protocol

from pagetrackd.domain import Vm


class Workload(Protocol):
    """One running workload on one VM."""

    kind: str

    def setup(self, vm: Vm) -> None:
        """Prepare the VM (create what the workload needs); called once before ``step``."""

    def step(self, vm: Vm, max_writes: int) -> int:
        """Perform up to ``max_writes`` guest writes (plus whatever non-write activity
        belongs between them); return how many writes were made. 0 means finished."""

    def report(self) -> dict[str, int | float | str]:
        """Workload-specific figures (faults, submissions, ...), flat."""
