"""Workloads by kind. Each factory takes (seed, options) and returns a Workload."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pagetrackd.workloads.base import Workload

#: kind -> factory(seed, options); filled in by the workload modules.
WORKLOADS: dict[str, Callable[[int, Mapping[str, Any]], Workload]] = {}

__all__ = ["WORKLOADS", "Workload"]

from pagetrackd.workloads.gpu_ppgtt import GpuPpgttWorkload  # noqa: E402
from pagetrackd.workloads.random_writes import RandomWritesWorkload  # noqa: E402

WORKLOADS["gpu-ppgtt"] = GpuPpgttWorkload
WORKLOADS["random-writes"] = RandomWritesWorkload

from pagetrackd.workloads.guest_pagetables import GuestPageTables  # noqa: E402
from pagetrackd.workloads.kernel_build import KernelBuild  # noqa: E402

WORKLOADS["guest-pagetables"] = GuestPageTables
WORKLOADS["kernel-build"] = KernelBuild
