"""The one error table: every domain error class has a status code and a stable reason,
docs/api.md lists every reason, and the details each kind of error carries (AIP-193)."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import google.rpc.error_details_pb2 as error_details_pb2
import grpc
import pytest

import pagetrackd
from pagetrack.v1 import pagetrack_pb2 as pb
from pagetrackd.domain import errors as e
from pagetrackd.transport import status
from pagetrackd.transport.status import STATUS_TABLE, field_at_fault, kind_for, rich_status

ROOT = Path(__file__).resolve().parents[2]


def _all_error_classes() -> set[type[e.PageTrackError]]:
    for info in pkgutil.walk_packages(pagetrackd.__path__, "pagetrackd."):
        if info.name != "pagetrackd.__main__":
            importlib.import_module(info.name)
    out: set[type[e.PageTrackError]] = set()
    todo: list[type[e.PageTrackError]] = [e.PageTrackError]
    while todo:
        cls = todo.pop()
        out.add(cls)
        todo.extend(cls.__subclasses__())
    return out


def test_every_domain_error_class_has_its_own_reason() -> None:
    """Each PageTrackError subclass anywhere in pagetrackd is listed in STATUS_TABLE by
    itself (a new class gets a reason of its own, not its parent's by accident)."""
    missing = sorted(c.__qualname__ for c in _all_error_classes() if c not in STATUS_TABLE)
    assert not missing, f"add these to STATUS_TABLE in transport/status.py: {missing}"


def test_reasons_are_stable_upper_snake_and_unique() -> None:
    """Reasons are UPPER_SNAKE (at most 63 characters, as AIP-193 asks) and no two classes
    share one, so a program can tell every error apart."""
    reasons = [k.reason for k in STATUS_TABLE.values()]
    assert len(set(reasons)) == len(reasons)
    for reason in reasons:
        assert re.fullmatch(r"[A-Z][A-Z0-9_]{0,61}[A-Z0-9]", reason), reason


def test_docs_list_every_reason_with_its_code() -> None:
    """docs/api.md's error table has a row per reason, naming its status code."""
    text = (ROOT / "docs" / "api.md").read_text()
    rows = dict(re.findall(r"^\| `([A-Z_0-9]+)` \| `?([A-Z_]+)`? \|", text, re.MULTILINE))
    for kind in STATUS_TABLE.values():
        if kind.code is grpc.StatusCode.INTERNAL:
            continue
        assert rows.get(kind.reason) == kind.code.name, f"docs/api.md: no row for {kind}"


def _details(exc: Exception, request: object = None) -> dict[str, object]:
    desc = getattr(request, "DESCRIPTOR", None)
    got = rich_status(exc, request=desc, tenant="alice")
    out: dict[str, object] = {}
    for packed in got.details:
        name = packed.TypeName().rsplit(".", 1)[-1]
        out[name] = getattr(error_details_pb2, name).FromString(packed.value)
    return out


def test_every_error_has_error_info_and_keeps_its_message() -> None:
    """Every class gets an ErrorInfo with its reason and the pagetrack.dev domain; the
    status message is the exception's (INTERNAL hides the bug's text)."""
    needs: dict[type[Exception], dict[str, object]] = {
        e.Compacted: {"oldest_seq": 5}, e.QuotaExceeded: {"quota": "vms", "limit": 3},
    }
    for cls in _all_error_classes():
        exc = cls("some message", **needs.get(cls, {}))
        got = rich_status(exc)
        info = _details(exc)["ErrorInfo"]
        assert isinstance(info, error_details_pb2.ErrorInfo)
        assert (info.reason, info.domain) == (kind_for(exc).reason, status.ERROR_DOMAIN)
        assert got.code == kind_for(exc).code.value[0]
        internal = kind_for(exc).code is grpc.StatusCode.INTERNAL
        assert (got.message == "some message") is not internal


def test_an_unmapped_exception_is_internal_without_its_text() -> None:
    """A bug (not a PageTrackError) becomes INTERNAL, reason INTERNAL, text withheld."""
    got = rich_status(KeyError("secret detail"))
    assert got.code == grpc.StatusCode.INTERNAL.value[0] and "secret" not in got.message


@pytest.mark.parametrize(
    ("exc", "request_msg", "field"),
    [
        (e.InvalidArgument("page_size 2000: at most 1000"), pb.ListVmsRequest(), "page_size"),
        (e.InvalidArgument("options.limits.gfn_bits 99 must be 12..40"), pb.CreateVmRequest(),
         "options.limits.gfn_bits"),
        (e.InvalidArgument("host_hz must be between 1e6 and 1e11, got 4"),
         pb.CreateVmRequest(), "options.cost.host_hz"),
        (e.InvalidArgument("host_hz must be between 1e6 and 1e11, got 4"),
         pb.SetVmPolicyRequest(), "cost.host_hz"),
        (e.InvalidArgument("VM name 'gpa' must start with a letter"), pb.CreateVmRequest(),
         "name"),
        (e.InvalidArgument("option 'x' must be an integer"), pb.AttachPluginRequest(),
         "options"),
        (e.InvalidArgument("gfn range start=0 count=0", field="ranges"),
         pb.TrackingChangeRequest(), "ranges"),
        (e.InvalidArgument("a write needs at least one byte of data", field="data"),
         pb.WriteGuestRequest(), "data"),
        (e.InvalidArgument("nothing here names a field"), pb.WriteGuestRequest(), ""),
        (e.InvalidArgument("the VM's limit 'x' passed: vcpu 'gpa' is wrong"),
         pb.WriteGuestRequest(), "vcpu"),
    ],
)
def test_field_at_fault(exc: e.InvalidArgument, request_msg: object, field: str) -> None:
    """The field violation names the field the error gives, else the first field of the
    request its message mentions (never a word inside the caller's quoted value)."""
    assert field_at_fault(exc, getattr(request_msg, "DESCRIPTOR", None)) == field
    bad = _details(exc, request_msg)["BadRequest"]
    assert isinstance(bad, error_details_pb2.BadRequest)
    assert [(v.field, v.description) for v in bad.field_violations] == [(field, str(exc))]


def test_quota_failure_and_retry_info() -> None:
    """A tenant quota names the tenant, quota and limit; a rate quota says when to retry;
    a counter limit has a QuotaFailure and no RetryInfo."""
    got = _details(e.QuotaExceeded("too fast", quota="write_rate", limit=100,
                                   retry_after_s=0.25))
    quota = got["QuotaFailure"]
    assert isinstance(quota, error_details_pb2.QuotaFailure)
    v = quota.violations[0]
    assert (v.subject, v.quota_id, v.quota_value) == ("tenant:alice", "write_rate", 100)
    retry = got["RetryInfo"]
    assert isinstance(retry, error_details_pb2.RetryInfo)
    assert retry.retry_delay.ToMilliseconds() == 250
    got = _details(e.CounterOverflow("gfn 0x1: track counter would pass 65535"))
    quota = got["QuotaFailure"]
    assert isinstance(quota, error_details_pb2.QuotaFailure)
    assert (quota.violations[0].quota_id, quota.violations[0].quota_value) == (
        "track_counter", 65535)
    assert "RetryInfo" not in got


def test_not_found_resource_info_is_the_callers_name_only() -> None:
    """ResourceInfo holds the type and the name as given, no owner: nothing that differs
    between a missing VM and another tenant's."""
    got = _details(e.VmNotFound("VM 'x' not found", name="x"))
    res = got["ResourceInfo"]
    assert isinstance(res, error_details_pb2.ResourceInfo)
    assert (res.resource_type, res.resource_name, res.owner) == ("vm", "x", "")
