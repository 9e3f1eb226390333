"""With tokens required, the stock discovery services still answer without one: health
checks and server reflection in both versions (grpcurl and grpc-js ask for v1 first)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2

from pagetrack.v1 import pagetrack_pb2 as pb
from pagetrack.v1 import pagetrack_pb2_grpc as pbg
from pagetrackd.auth import hash_token
from tests.daemon_process import DaemonProcess, start_daemon
from tests.rich_status import details_of


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(f'[[token]]\nsha256 = "{hash_token("k")}"\ntenant = "t"\nrole = "tenant"\n')
    d = start_daemon(tmp_path, "--tokens-file", str(tokens))
    yield d
    assert d.stop() == 0


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_reflection_answers_without_a_token(daemon: DaemonProcess, version: str) -> None:
    """Reflection lists the services to a caller with no token; the API itself refuses
    that caller with UNAUTHENTICATED and reason TOKEN_INVALID."""
    async with grpc.aio.insecure_channel(daemon.tcp) as ch:
        call: Any = ch.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        replies = [r async for r in call]
        names = {s.name for s in replies[0].list_services_response.service}
        assert "pagetrack.v1.VmService" in names
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pbg.VmServiceStub(ch).ListVms(pb.ListVmsRequest())
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert details_of(info.value)["google.rpc.ErrorInfo"].reason == "TOKEN_INVALID"
