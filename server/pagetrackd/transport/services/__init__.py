"""The gRPC servicers, one module per service: each validates a request's shape,
converts it, calls the application layer and converts the typed result back."""

from pagetrackd.transport.services.admin import AdminService
from pagetrackd.transport.services.lease import LeaseService
from pagetrackd.transport.services.memory import MemoryService
from pagetrackd.transport.services.plugin import PluginService
from pagetrackd.transport.services.tracking import TrackingService
from pagetrackd.transport.services.vm import VmService
from pagetrackd.transport.services.workload import WorkloadService

__all__ = [
    "AdminService",
    "LeaseService",
    "MemoryService",
    "PluginService",
    "TrackingService",
    "VmService",
    "WorkloadService",
]
