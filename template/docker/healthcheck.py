#!/usr/bin/env python3
"""Healthy means working: exit 0 only when the code server can serve the code location.

`dagster api grpc-health-check` answers SERVING even while the location fails to load (the code
server then serves the error), so the stack would report healthy and the UI would show no jobs.
This asks the server for its repositories, as the webserver does, and fails, printing the load
error, when it gets an error instead. It speaks gRPC without importing Dagster (~0.2 s of CPU,
not ~3 s), so it can run every few seconds.

    healthcheck.py [PORT]      # default 4000
"""

import json
import sys

import grpc

# dagster/_grpc/protos/dagster_api.proto: ListRepositoriesRequest is empty, and the reply holds
# one string (field 1): the serialized ListRepositoriesResponse, or a SerializableErrorInfo.
METHOD = "/api.DagsterApi/ListRepositories"


def _only_string_field(message: bytes) -> str:
    if not message:
        return ""
    if message[0] != 0x0A:  # field 1, length-delimited
        raise ValueError(f"unexpected reply from the code server: {message[:40]!r}")
    length, shift, index = 0, 0, 1
    while True:
        byte = message[index]
        length |= (byte & 0x7F) << shift
        index, shift = index + 1, shift + 7
        if not byte & 0x80:
            return message[index : index + length].decode()


def _error_text(error: dict) -> str:
    lines = [error.get("message", "").strip()]
    cause = error.get("cause")
    while cause:
        lines.append(f"caused by: {cause.get('message', '').strip()}")
        cause = cause.get("cause")
    return "\n".join(lines)


def main(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
        try:
            reply = call(b"", timeout=8)
        except grpc.RpcError as exc:
            print(f"code server on port {port} is not answering: {exc.code()}", file=sys.stderr)
            return 1
    payload = json.loads(_only_string_field(reply) or "{}")
    if payload.get("__class__") != "ListRepositoriesResponse":
        print(f"the code location does not load:\n{_error_text(payload)}", file=sys.stderr)
        return 1
    names = [s.get("repository_name") for s in payload.get("repository_symbols", [])]
    print(f"code location loaded: {', '.join(map(str, names))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 4000))
