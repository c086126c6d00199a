"""The platform's errors are the wire contract's (walle.protos.errors): devices and the cloud
raise the same classes, mapped to the same gRPC status codes."""
from walle.protos.errors import (AlreadyExists, FailedPrecondition, InvalidArgument, NotFound,  # noqa: F401
                                 PermissionDenied, ResourceExhausted, Unauthenticated, Unavailable, WalleError)
