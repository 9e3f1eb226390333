"""Checks on the google.rpc.Status details the daemon attaches to every error it sends."""

from __future__ import annotations

import re
from typing import Any

import google.rpc.error_details_pb2 as error_details_pb2
import grpc
from google.protobuf.descriptor import Descriptor
from grpc_status import rpc_status

#: ErrorInfo.domain of every pagetrackd error
DOMAIN = "pagetrack.dev"
_REASON = re.compile(r"[A-Z][A-Z0-9_]*[A-Z0-9]")
#: codes the daemon's own errors never use; gRPC itself sends them without details
_TRANSPORT_CODES = {
    grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED,
}


def is_field_path(message: Descriptor, path: str) -> bool:
    """Whether ``path`` (dotted) names a field of ``message`` or of its nested messages."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        field = message.fields_by_name.get(part)
        if field is None:
            return False
        if i < len(parts) - 1:
            if field.message_type is None:
                return False
            message = field.message_type
    return True


def details_of(err: Any) -> dict[str, Any]:
    """The unpacked details of a failed call, by type name; {} when it has none."""
    status = rpc_status.from_call(err)
    out: dict[str, Any] = {}
    if status is None:
        return out
    assert status.code == err.code().value[0] and status.message == err.details()
    for packed in status.details:
        name = packed.TypeName()
        cls = getattr(error_details_pb2, name.rsplit(".", 1)[-1])
        assert name.startswith("google.rpc.") and name not in out, name
        out[name] = cls.FromString(packed.value)
    return out


def check_details(err: Any, request_type: Descriptor | None) -> str | None:
    """What is wrong with the details of a daemon error (None when all is well): an
    ErrorInfo with an UPPER_SNAKE reason and our domain on every error, a BadRequest for
    INVALID_ARGUMENT whose field, when named, is one of the request's, a QuotaFailure for
    RESOURCE_EXHAUSTED, a ResourceInfo for NOT_FOUND."""
    code = err.code()
    if code in _TRANSPORT_CODES:
        return None
    got = details_of(err)
    if code == grpc.StatusCode.UNAVAILABLE and not got:
        return None  # the connection, not the daemon (the daemon's own says SHUTTING_DOWN)
    info = got.get("google.rpc.ErrorInfo")
    if info is None:
        return f"{code.name} without ErrorInfo: {err.details()!r}"
    if info.domain != DOMAIN or not _REASON.fullmatch(info.reason):
        return f"bad ErrorInfo {info}"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        bad = got.get("google.rpc.BadRequest")
        if bad is None or not bad.field_violations:
            return f"INVALID_ARGUMENT without field violations: {err.details()!r}"
        for v in bad.field_violations:
            # "" = the message names no field (rare; never a wrong one)
            if request_type is not None and v.field and not is_field_path(request_type, v.field):
                return (f"field violation {v.field!r} is not a field of"
                        f" {request_type.full_name}: {err.details()!r}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "google.rpc.QuotaFailure" not in got:
        return f"RESOURCE_EXHAUSTED without QuotaFailure: {err.details()!r}"
    if code == grpc.StatusCode.NOT_FOUND and "google.rpc.ResourceInfo" not in got:
        return f"NOT_FOUND without ResourceInfo: {err.details()!r}"
    return None
