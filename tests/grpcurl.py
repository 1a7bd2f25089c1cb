"""The part of grpcurl's command line that the walk-through uses, over server
reflection (v1alpha) with no compiled stubs, printing what grpcurl prints: the
response as proto3 JSON (lowerCamelCase names, default values omitted, two
spaces of indent), errors as "ERROR:\\n  Code: ...\\n  Message: ..." with exit
status 64 + the gRPC code.

usage: grpcurl.py -cacert CA -cert CERT -key KEY [-d JSON] HOST:PORT list [SERVICE]
       grpcurl.py -cacert CA -cert CERT -key KEY [-d JSON] HOST:PORT SERVICE/METHOD
"""

import json
import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def parse(argv):
    flags, rest = {}, []
    i = 0
    while i < len(argv):
        if argv[i] in ("-cacert", "-cert", "-key", "-d"):
            flags[argv[i][1:]] = argv[i + 1]
            i += 2
        else:
            rest.append(argv[i])
            i += 1
    return flags, rest


def pascal(code):
    return "".join(word.capitalize() for word in code.name.split("_"))


def main():
    flags, rest = parse(sys.argv[1:])
    addr, verb = rest[0], rest[1]
    with open(flags["cacert"], "rb") as ca, open(flags["cert"], "rb") as cert, open(
        flags["key"], "rb"
    ) as key:
        creds = grpc.ssl_channel_credentials(ca.read(), key.read(), cert.read())
    # The quickstart's server certificates name localhost and 127.0.0.1.
    channel = grpc.secure_channel(
        addr, creds, options=[("grpc.ssl_target_name_override", "localhost")]
    )
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))

    if verb == "list":
        if len(rest) > 2:
            service = pool.FindServiceByName(rest[2])
            for method in service.methods:
                print(method.full_name)
            return 0
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        for response in stub.ServerReflectionInfo(iter([request]), timeout=10):
            for listed in sorted(s.name for s in response.list_services_response.service):
                print(listed)
        return 0

    service_name, method_name = verb.rsplit("/", 1)
    method = pool.FindServiceByName(service_name).FindMethodByName(method_name)
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    call = channel.unary_unary(
        "/" + service_name + "/" + method_name,
        request_serializer=request_class.SerializeToString,
        response_deserializer=response_class.FromString,
    )
    request = json_format.ParseDict(json.loads(flags.get("d", "{}")), request_class())
    try:
        response = call(request, timeout=30)
    except grpc.RpcError as err:
        print("ERROR:", file=sys.stderr)
        print("  Code:", pascal(err.code()), file=sys.stderr)
        print("  Message:", err.details(), file=sys.stderr)
        return 64 + err.code().value[0]
    print(json_format.MessageToJson(response, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
