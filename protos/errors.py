"""Errors shared by the cloud and devices. Each maps to one gRPC status code and one CLI
exit code, so a refusal reads the same whether the CLI works on a data folder or talks to a server."""


class WalleError(Exception):
    """Base class. The message names the problem for a person."""

    grpc_code = "INTERNAL"
    exit_code = 1

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(WalleError):
    grpc_code = "INVALID_ARGUMENT"
    exit_code = 2


class NotFound(WalleError):
    grpc_code = "NOT_FOUND"
    exit_code = 3


class AlreadyExists(WalleError):
    grpc_code = "ALREADY_EXISTS"
    exit_code = 4


class FailedPrecondition(WalleError):
    grpc_code = "FAILED_PRECONDITION"
    exit_code = 5


class PermissionDenied(WalleError):
    grpc_code = "PERMISSION_DENIED"
    exit_code = 6


class Unauthenticated(WalleError):
    grpc_code = "UNAUTHENTICATED"
    exit_code = 6


class ResourceExhausted(WalleError):
    grpc_code = "RESOURCE_EXHAUSTED"
    exit_code = 7


class Unavailable(WalleError):
    grpc_code = "UNAVAILABLE"
    exit_code = 8


_BY_STATUS = {cls.grpc_code: cls for cls in (InvalidArgument, NotFound, AlreadyExists, FailedPrecondition,
                                             PermissionDenied, Unauthenticated, ResourceExhausted, Unavailable)}


def from_status(code: str, details: str) -> WalleError:
    """The error a gRPC status code stands for (name as in grpc.StatusCode), so a failed remote call
    exits and reads like the same failure on a local data folder."""
    if code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
        return Unavailable(f"platform unreachable: {details}")
    return _BY_STATUS.get(code, WalleError)(details or code)
