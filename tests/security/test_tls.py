"""TLS: a daemon started with --tls-cert/--tls-key serves its TCP address over TLS only. A
client that trusts the CA connects (unary calls and a Watch stream work); a plaintext
client, and a client that trusts another CA, are refused before any call runs."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from pagetrack.v1 import pagetrack_pb2 as pb
from pagetrack.v1 import pagetrack_pb2_grpc as pbg
from tests.daemon_process import DaemonProcess, start_daemon

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="needs the openssl command")


def _openssl(*args: str, cwd: Path) -> None:
    assert OPENSSL is not None
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(d: Path, name: str) -> Path:
    """A CA key and self-signed certificate in ``d``; returns the certificate."""
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
             "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign", cwd=d)
    return d / f"{name}.pem"


def make_server_cert(d: Path, ca: str) -> tuple[Path, Path]:
    """A server key and a certificate for localhost and 127.0.0.1 signed by ``ca``."""
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost", cwd=d)
    (d / "san.ext").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
        "basicConstraints=CA:FALSE\n"
    )
    _openssl("x509", "-req", "-in", "server.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "san.ext",
             cwd=d)
    return d / "server.pem", d / "server.key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d, "test-ca")
    other = make_ca(d, "other-ca")
    cert, key = make_server_cert(d, "test-ca")
    return {"ca": ca, "other": other, "cert": cert, "key": key, "dir": d}


@pytest.fixture(scope="module")
def daemon(pki: dict[str, Path]) -> Iterator[DaemonProcess]:
    d = start_daemon(pki["dir"], "--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"]))
    yield d
    assert d.stop() == 0


def _port(daemon: DaemonProcess) -> str:
    return daemon.tcp.rsplit(":", 1)[1]


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
async def test_client_with_the_ca_connects(
    daemon: DaemonProcess, pki: dict[str, Path], host: str
) -> None:
    """Unary calls and a Watch stream work over TLS, by name and by address."""
    creds = grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes())
    async with grpc.aio.secure_channel(f"{host}:{_port(daemon)}", creds) as ch:
        info = await pbg.AdminServiceStub(ch).GetServerInfo(pb.GetServerInfoRequest())
        assert info.version
        vm = f"tls-{host.replace('.', '-')}"
        await pbg.VmServiceStub(ch).CreateVm(pb.CreateVmRequest(name=vm))
        await pbg.MemoryServiceStub(ch).SetMemoryRegion(
            pb.SetMemoryRegionRequest(vm=vm, slot=0, npages=16))
        await pbg.TrackingServiceStub(ch).AddTracking(
            pb.TrackingChangeRequest(vm=vm, gfns=[3]))
        stream: Any = pbg.WatchServiceStub(ch).Watch(pb.WatchRequest(vm=vm))
        assert (await stream.read()).HasField("registered")
        await pbg.MemoryServiceStub(ch).WriteGuest(
            pb.WriteGuestRequest(vm=vm, gpa=3 << 12, data=b"secret"))
        msg = await stream.read()
        assert list(msg.events.seq) == [1] and msg.events.data == b"secret"
        stream.cancel()


async def _refused(channel: grpc.aio.Channel) -> grpc.StatusCode:
    async with channel as ch:
        try:
            await pbg.AdminServiceStub(ch).GetServerInfo(pb.GetServerInfoRequest(), timeout=5)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


async def test_plaintext_client_is_refused(daemon: DaemonProcess) -> None:
    """A client speaking plaintext HTTP/2 to the TLS port gets no answer from the API."""
    code = await _refused(grpc.aio.insecure_channel(daemon.tcp))
    assert code == grpc.StatusCode.UNAVAILABLE


async def test_client_trusting_another_ca_is_refused(
    daemon: DaemonProcess, pki: dict[str, Path]
) -> None:
    """The handshake fails for a client that does not trust the server's CA."""
    creds = grpc.ssl_channel_credentials(root_certificates=pki["other"].read_bytes())
    code = await _refused(grpc.aio.secure_channel(f"localhost:{_port(daemon)}", creds))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert daemon.proc.poll() is None  # failed handshakes leave the daemon serving
