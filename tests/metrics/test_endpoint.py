"""The Prometheus endpoint of a real daemon."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pagetrack.v1 import pagetrack_pb2 as pb
from tests.state.daemon import Daemon, free_port, start_daemon
from tests.state.scenario import PAGE, build_vm
from tests.waiting import HANG_S

Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape(d: Daemon) -> Samples:
    """Every sample of the endpoint, by sample name."""
    with urllib.request.urlopen(f"http://{d.metrics}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(
        v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items())
    )


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("metrics")
    d = start_daemon(
        tmp, "--metrics-port", str(free_port()), "--state-dir", str(tmp / "state"),
        "--metrics-max-vms", "3",
    )
    yield d
    d.stop()


def test_families_after_some_writes(daemon: Daemon) -> None:
    """After writes, a Watch stream and a plugin, every family is served with tenant and
    vm labels and the values the API reports."""
    build_vm(daemon)
    stream = daemon.stub("WatchService").Watch(pb.WatchRequest(vm="vm1", max_batch_delay_ms=1))
    assert next(stream).WhichOneof("kind") == "registered"
    daemon.stub("MemoryService").WriteGuest(
        pb.WriteGuestRequest(vm="vm1", vcpu=0, gpa=2 * PAGE, data=b"watched")
    )
    for msg in stream:
        if msg.WhichOneof("kind") == "events":
            break
    with pytest.raises(grpc.RpcError):
        daemon.stub("VmService").GetVm(pb.GetVmRequest(vm="missing"))
    # The client can see a call's status a moment before the server has finished it.
    deadline = time.monotonic() + HANG_S
    while True:
        m = scrape(daemon)
        failed = value(m, "pagetrack_rpc_requests_total", method="GetVm", code="NOT_FOUND")
        if failed or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    stats = daemon.stub("AdminService").GetStats(pb.GetStatsRequest(vm="vm1")).vms[0]
    vm = {"tenant": "default", "vm": "vm1"}
    assert value(m, "pagetrack_guest_writes_total", **vm) == stats.guest_writes
    assert value(m, "pagetrack_write_pieces_total", path="emulated", **vm) == stats.writes.emulated
    assert value(m, "pagetrack_write_pieces_total", path="fast", **vm) == stats.writes.fast
    assert value(m, "pagetrack_emulations_total", **vm) == stats.emulations
    assert "pagetrack_mmio_exits_total" in m
    assert value(m, "pagetrack_events_total", **vm) == stats.head_seq
    assert value(m, "pagetrack_events_sent_total", **vm) >= 1
    assert "pagetrack_events_dropped_total" in m and "pagetrack_events_coalesced_total" in m
    assert value(m, "pagetrack_watchers", **vm) == 1
    assert "pagetrack_stream_lag_events" in m and "pagetrack_stream_queue_depth_events" in m
    assert value(m, "pagetrack_tracked_gfns", **vm) == stats.tracked_gfns
    assert value(m, "pagetrack_dma_total", outcome="notified", **vm) == stats.dma.notified
    assert value(m, "pagetrack_plugin_attached", plugin="vgpu", **vm) == 1
    assert value(m, "pagetrack_plugin_status", plugin="vgpu", key="protected_gfns", **vm) == 4
    assert value(m, "pagetrack_plugin_tracked_gfns", plugin="vgpu", **vm) == 4
    assert value(
        m, "pagetrack_rpc_requests_total", service="VmService", method="CreateVm", code="OK"
    ) == 1
    assert value(
        m, "pagetrack_rpc_requests_total", service="VmService", method="GetVm", code="NOT_FOUND"
    ) == 1
    assert value(
        m, "pagetrack_rpc_duration_seconds_count", service="MemoryService", method="WriteGuest"
    ) >= 8
    assert value(m, "pagetrack_leases", tenant="default", kind="ttl") == 1
    assert value(m, "pagetrack_leases", tenant="default", kind="stream") == 1
    assert "pagetrack_state_saves_total" in m
    stream.cancel()


def test_vms_past_the_cap_share_one_label(daemon: Daemon) -> None:
    """Past --metrics-max-vms, VMs are added up under vm="_other"."""
    vms = daemon.stub("VmService")
    for i in range(4):
        vms.CreateVm(pb.CreateVmRequest(name=f"many-{i}"))
    m = scrape(daemon)
    labels = {lab["vm"] for lab, _ in m["pagetrack_memslots"]}
    assert labels == {"vm1", "many-0", "many-1", "_other"}
    assert value(m, "pagetrack_metrics_vms_aggregated") == 2
    assert value(m, "pagetrack_vms", tenant="default") == 5


def test_unknown_path_is_404(daemon: Daemon) -> None:
    """Only /metrics (and /healthz) are served."""
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://{daemon.metrics}/nope", timeout=10)
    assert err.value.code == 404
    err.value.close()
