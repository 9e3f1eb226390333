"""The cost model: simulated CPU cycles per write path.

The seed thread's argument: a write-tracked page whose writes exit to user space costs
about 5000 cycles per write, so 100k writes/s cost about 15% of a host CPU, while
in-kernel trap-and-emulate is far cheaper. These numbers let users reproduce it.

Where each default comes from (docs/kvm-rules.md repeats this):

* ``mmio_exit_cycles = 5000``: the figure stated in the 2016 page-track thread for a
  write that exits to user space; quoted, not measured here.
* ``emulate_cycles = 1500``: an assumption. No source gives it; it only encodes "an
  in-kernel exit plus emulation is a few times cheaper than a user-space exit". Measure
  your host and set your own (SetVmPolicy's cost model).
* ``host_hz = 3.3e9``: an assumption, a typical server core clock, chosen so that the
  thread's 5000 cycles at 100k writes/s come to its ~15% (5000 * 1e5 / 3.3e9 = 0.152).
* ``fast_cycles = 0`` and ``dma_cycles = 0``: native stores and device writes cost the
  vCPU nothing in this model (an assumption: no exit happens).
"""

from __future__ import annotations

from dataclasses import dataclass

from pagetrackd.domain.errors import InvalidArgument


@dataclass(frozen=True, slots=True)
class CostModel:
    """Simulated cycles charged per piece, by path, and the host's clock rate."""

    mmio_exit_cycles: int = 5000  #: a user-space exit (the 2016 thread's figure, quoted)
    emulate_cycles: int = 1500  #: in-kernel trap + emulate + notify (an assumption)
    fast_cycles: int = 0  #: a native store; no exit at all
    dma_cycles: int = 0  #: a device write into guest memory
    host_hz: float = 3.3e9  #: cycles per second of one host CPU (an assumption; see above)

    def __post_init__(self) -> None:
        for name in ("mmio_exit_cycles", "emulate_cycles", "fast_cycles", "dma_cycles"):
            value = getattr(self, name)
            if not 0 <= value <= 10**9:
                raise InvalidArgument(f"{name} must be between 0 and 1e9 cycles, got {value}")
        if not 1e6 <= self.host_hz <= 1e11:
            raise InvalidArgument(f"host_hz must be between 1e6 and 1e11, got {self.host_hz}")

    def cpu_fraction(self, cycles_per_write: int, writes_per_s: float) -> float:
        """The share of one host CPU that ``writes_per_s`` writes at this cost take."""
        return cycles_per_write * writes_per_s / self.host_hz
