"""RpcMetrics keeps each (method, code)'s metric children: counts stay exact per label set."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from pagetrackd.metrics import RpcMetrics


def test_each_method_and_code_counts_apart() -> None:
    registry = CollectorRegistry()
    rpc = RpcMetrics(registry)
    for _ in range(3):
        rpc.observe("/pagetrack.v1.MemoryService/WriteGuestBatch", "OK", 0.001)
    rpc.observe("/pagetrack.v1.MemoryService/WriteGuestBatch", "INVALID_ARGUMENT", 0.002)
    rpc.observe("/pagetrack.v1.VmService/GetVm", "OK", 0.5)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    batch = {"service": "MemoryService", "method": "WriteGuestBatch"}
    assert value("pagetrack_rpc_requests_total", **batch, code="OK") == 3
    assert value("pagetrack_rpc_requests_total", **batch, code="INVALID_ARGUMENT") == 1
    assert value("pagetrack_rpc_duration_seconds_count", **batch, code="OK") == 3
    assert value("pagetrack_rpc_duration_seconds_sum", **batch, code="OK") == pytest.approx(0.003)
    assert value("pagetrack_rpc_requests_total", service="VmService", method="GetVm",
                 code="OK") == 1
