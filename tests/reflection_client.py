"""Lists and calls a cmk service through server reflection (v1alpha), the way
grpcurl does: no compiled stubs, only what the server describes about itself.

usage: reflection_client.py HOST:PORT CA CERT KEY [SERVICE [REQUEST_JSON]]
Prints each service, then each method of SERVICE (default cmk.hsm.v1.HsmService),
then the key_id field of a GetImportPublicKey call made from the reflected
descriptors with REQUEST_JSON (default {}) as its request.
"""

import sys

import grpc
import json

from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def main():
    addr, ca, cert, key = sys.argv[1:5]
    service = sys.argv[5] if len(sys.argv) > 5 else "cmk.hsm.v1.HsmService"
    request_json = json.loads(sys.argv[6]) if len(sys.argv) > 6 else {}
    with open(ca, "rb") as f_ca, open(cert, "rb") as f_cert, open(key, "rb") as f_key:
        creds = grpc.ssl_channel_credentials(f_ca.read(), f_key.read(), f_cert.read())
    channel = grpc.secure_channel(
        addr, creds, options=[("grpc.ssl_target_name_override", "localhost")]
    )
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    for response in stub.ServerReflectionInfo(iter([request]), timeout=10):
        for listed in response.list_services_response.service:
            print("service", listed.name)

    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    described = pool.FindServiceByName(service)
    for method in described.methods:
        print("method", method.name)

    get_key = described.FindMethodByName("GetImportPublicKey")
    request_class = message_factory.GetMessageClass(get_key.input_type)
    response_class = message_factory.GetMessageClass(get_key.output_type)
    call = channel.unary_unary(
        "/" + service + "/GetImportPublicKey",
        request_serializer=request_class.SerializeToString,
        response_deserializer=response_class.FromString,
    )
    request = json_format.ParseDict(request_json, request_class())
    print("key_id", call(request, timeout=10).key_id)


if __name__ == "__main__":
    main()
