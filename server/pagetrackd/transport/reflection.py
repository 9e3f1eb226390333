"""Server reflection under both names clients ask for: grpc.reflection.v1 and v1alpha.

grpcio-reflection ships only v1alpha. v1 is the same protocol under a new package (every
message and field number is the same, grpc-proto grpc/reflection/v1/reflection.proto), so
one servicer answers both: current grpcurl and grpc-js ask for v1 first, older tools for
v1alpha. Both are registered as generic handlers, never as registered methods (see
``app._GenericOnly`` for why).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1ALPHA_SERVICE = reflection.SERVICE_NAME  # grpc.reflection.v1alpha.ServerReflection
V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE = f"{V1_PACKAGE}.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"


def _add_v1_descriptor() -> None:
    """Put grpc/reflection/v1/reflection.proto in the default pool, made from v1alpha's
    file with the package renamed, so reflection can describe its own v1 service."""
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(_V1_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old = f".{proto.package}."
    proto.name = _V1_FILE
    proto.package = V1_PACKAGE
    proto.options.Clear()  # v1alpha's java/objc options name v1alpha packages
    for message in proto.message_type:
        for field in message.field:
            if field.type_name:  # setting an empty one would mark it present
                    field.type_name = field.type_name.replace(old, f".{V1_PACKAGE}.")
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old, f".{V1_PACKAGE}.")
            method.output_type = method.output_type.replace(old, f".{V1_PACKAGE}.")
    pool.Add(proto)


def reflection_handlers(service_names: Iterable[str]) -> list[grpc.GenericRpcHandler]:
    """Generic handlers serving reflection as v1 and v1alpha; ``service_names`` are the
    application's services (the reflection services are added)."""
    _add_v1_descriptor()
    servicer = reflection.aio.ReflectionServicer((*service_names, V1_SERVICE, V1ALPHA_SERVICE))
    method: Any = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    return [
        grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": method})
        for name in (V1_SERVICE, V1ALPHA_SERVICE)
    ]


__all__ = ["V1ALPHA_SERVICE", "V1_SERVICE", "reflection_handlers"]
