"""The default configuration caps what one tenant can make a shared daemon hold."""

from __future__ import annotations

from pathlib import Path

from pagetrack.v1 import pagetrack_pb2 as pb
from pagetrackd.config import Config
from tests.daemon_process import start_daemon
from tests.integration.support import connect
from tests.robustness.starve_support import MiB, refused

GiB = 1 << 30


async def test_default_quotas_exist_and_hold(tmp_path: Path) -> None:
    """Every byte quota is set by default, at most 1 GiB a tenant, and applies: a VM
    asking for 4 GiB of event history is refused (today's code accepted it)."""
    d = start_daemon(tmp_path)
    try:
        api = connect(d.tcp)
        info = await api.admin.GetServerInfo(pb.GetServerInfoRequest())
        q = info.quotas
        for name in ("guest_memory_bytes", "tracking_bytes", "history_bytes",
                     "stream_queue_bytes", "recording_bytes", "upload_bytes"):
            assert 0 < getattr(q, name) <= GiB, (name, getattr(q, name))
        assert 0 < q.leases <= 4096 and 0 < q.finished_workloads <= 1024
        assert 0 < info.limits.default_queue_bytes <= info.limits.max_queue_bytes <= 256 * MiB
        assert 0 < Config().health_watchers <= 1024
        await refused(
            api.vm.CreateVm(pb.CreateVmRequest(
                name="big-history",
                options=pb.VmOptions(limits=pb.VmLimits(history_bytes=4 * GiB)))),
            "history_bytes",
        )
        assert not (await api.vm.ListVms(pb.ListVmsRequest())).vms
        await api.channel.close()
    finally:
        assert d.stop() == 0
