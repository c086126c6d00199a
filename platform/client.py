"""AdminService over gRPC with the same method names as `Platform`, raising the same errors."""
from __future__ import annotations

import grpc

from walle.protos import admin_pb2_grpc
from walle.protos.errors import WalleError, from_status


def error_from_rpc(e: grpc.RpcError) -> WalleError:
    return from_status(e.code().name if e.code() else "UNKNOWN", e.details() or "")


class RemoteAdmin:
    def __init__(self, channel: grpc.Channel, metadata: tuple = (), timeout: float = 60.0):
        self.channel = channel
        self.stub = admin_pb2_grpc.AdminServiceStub(channel)
        self.metadata = metadata
        self.timeout = timeout

    def __getattr__(self, name: str):
        method = getattr(self.stub, name)

        def call(request=None):
            try:
                return method(request, metadata=self.metadata, timeout=self.timeout)
            except grpc.RpcError as e:
                raise error_from_rpc(e) from None
        return call

    def close(self) -> None:
        self.channel.close()
