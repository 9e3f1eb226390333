"""The application layer: every use case of the daemon, without any wire format.

One module per job, stacked into :class:`Engine`: tenancy and quotas
(:mod:`.tenancy`), plugins (:mod:`.plugins`), recordings (:mod:`.recordings`), VMs
(:mod:`.vms`), Watch streams (:mod:`.streams`), leases (:mod:`.leasing`) and workloads
(:mod:`.workload_runs`); :mod:`.engine` adds the lifecycle. It imports the domain, the
plugins and the workloads; nothing here imports gRPC or the transport, and the domain
imports nothing of it.
"""

from pagetrackd.application.config import EngineConfig, make_quotas
from pagetrackd.application.engine import Engine
from pagetrackd.application.entries import VmEntry, WorkloadRun
from pagetrackd.limits import Quotas

__all__ = ["Engine", "EngineConfig", "Quotas", "VmEntry", "WorkloadRun", "make_quotas"]
