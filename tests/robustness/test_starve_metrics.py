"""/metrics names tenants and VMs: with a tokens file it answers only a bearer token of
role metrics (or admin), as Prometheus sends one; without tokens it stays on loopback
unless told --insecure."""

from __future__ import annotations

import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from pagetrack.v1 import pagetrack_pb2 as pb
from tests.daemon_process import BIN
from tests.robustness.starve_support import ATTACKER, SCRAPER, VICTIM, Tenant, daemon
from tests.state.daemon import free_port


def _scrape(address: str, token: str | None) -> tuple[int, str]:
    request = urllib.request.Request(f"http://{address}/metrics")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def test_metrics_need_a_scrape_token_when_tokens_are_configured(tmp_path: Path) -> None:
    """Today's code served 55 series naming tenants and VMs to anyone."""
    with daemon(tmp_path, "", "--metrics-port", str(free_port())) as d:
        vic = Tenant(d.tcp, VICTIM)
        await vic.new_vm(64)
        status, body = _scrape(d.metrics, None)
        assert status == 401 and "victim" not in body
        status, body = _scrape(d.metrics, VICTIM)  # a tenant's token does not scrape
        assert status == 401 and "victim" not in body
        status, body = _scrape(d.metrics, "no-such-token")
        assert status == 401
        await vic.close()


async def test_a_metrics_token_scrapes_and_calls_nothing(tmp_path: Path) -> None:
    with daemon(tmp_path, "", "--metrics-port", str(free_port())) as d:
        att = Tenant(d.tcp, ATTACKER)
        await att.new_vm(64)
        status, body = _scrape(d.metrics, SCRAPER)
        assert status == 200 and 'tenant="attacker"' in body
        scraper = Tenant(d.tcp, SCRAPER)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await scraper.call(scraper.api.vm.ListVms, pb.ListVmsRequest())
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        await att.close()
        await scraper.close()


def test_metrics_on_every_interface_need_tokens_or_insecure(tmp_path: Path) -> None:
    """Refused at start, with one line saying why and what to give; nothing is bound."""
    out = subprocess.run(
        [str(BIN / "pagetrackd"), "--listen", "127.0.0.1:0", "--metrics-port", "9",
         "--metrics-host", "0.0.0.0"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "metrics" in lines[0] and "--tokens-file" in lines[0] and "--insecure" in lines[0]
