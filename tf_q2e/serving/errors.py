"""`ServingError`: one error type for the server and the client, in gRPC's codes.

TensorFlow Serving reports every failure as a gRPC status code plus a message,
and its REST API maps the code to an HTTP status. The development server raises
`ServingError` wherever a request is refused, and the client raises it for
whatever the server (or the network) answered, so callers match on
`error.code` the same way whichever protocol they used.
"""

from __future__ import annotations

import grpc

# gRPC code -> HTTP status, as TensorFlow Serving's REST API maps them, except
# RESOURCE_EXHAUSTED: this server raises it only for an oversized request.
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 413,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_CODE_OF_HTTP = {status: code for code, status in _HTTP_STATUS.items() if code != grpc.StatusCode.FAILED_PRECONDITION}
_CODE_OF_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


class ServingError(Exception):
    """A request the server refused or could not answer.

    Attributes:
        code: the gRPC status code, e.g. `grpc.StatusCode.NOT_FOUND`.
        message: what went wrong, naming the model, version, signature or input.
    """

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        """The HTTP status the REST API answers with for this error."""
        return _HTTP_STATUS.get(self.code, 500)


def code_of_http_status(status: int) -> grpc.StatusCode:
    """The gRPC code for an HTTP error status (UNKNOWN when there is none)."""
    return _CODE_OF_HTTP.get(status, grpc.StatusCode.UNKNOWN)


def code_of_number(number: int | None) -> grpc.StatusCode:
    """The gRPC code with this number (as in `tensorflow.error.Code`); UNKNOWN otherwise."""
    return _CODE_OF_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def invalid(message: str) -> ServingError:
    """An INVALID_ARGUMENT error: the request is malformed."""
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> ServingError:
    """A NOT_FOUND error: no such model, version or signature."""
    return ServingError(grpc.StatusCode.NOT_FOUND, message)
