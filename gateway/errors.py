"""Ragline's exceptions, and the one place that renders them as OpenAI errors.

    RaglineError                      500 server_error (anything unexpected that we raised)
    ├── InvalidRequest                400 invalid_request_error (names the offending ``param``)
    │   ├── ContextLengthExceeded     400 code=context_length_exceeded
    │   └── UnsupportedParameter      400 code=unsupported_parameter
    ├── AuthenticationFailed          401 authentication_error
    ├── PermissionDenied              403 permission_error
    ├── NotFound                      404 not_found_error (unknown model, route, object)
    │   └── ModelNotFound             404 code=model_not_found
    ├── PayloadTooLarge               413 invalid_request_error
    ├── RateLimited                   429 rate_limit_error (+ Retry-After)
    ├── Overloaded                    503 server_overloaded (+ Retry-After): queue full, not ready
    ├── BackendError                  502 upstream failure (a 5xx, a broken connection, a timeout)
    ├── InvalidOutput                 502 code=invalid_model_output: an answer off its schema
    ├── UpstreamError                 the upstream's own 4xx, its status, type, param and code
    └── ModelAssetError               (command line only) fetching or converting a model failed

Every error carries ``message``, ``type``, ``param`` and ``code`` exactly as OpenAI's error body
does; ``headers`` adds response headers such as ``Retry-After``. ``retryable`` errors (a backend
that is down, overloaded or broke before answering) let the pipeline try a model's fallbacks.
Errors of the libraries ragline uses are mapped to these in one place, ``as_ragline_error``.
"""

from __future__ import annotations

from typing import Any


class RaglineError(Exception):
    status_code = 500
    error_type = "server_error"
    default_code: str | None = None
    retryable = False

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The OpenAI error body: ``{"error": {"message", "type", "param", "code"}}``."""
        return error_body(self.message, self.error_type, self.param, self.code)


def error_body(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


class InvalidRequest(RaglineError):
    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    default_code = "context_length_exceeded"


class UnsupportedParameter(InvalidRequest):
    default_code = "unsupported_parameter"


class AuthenticationFailed(RaglineError):
    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDenied(RaglineError):
    status_code = 403
    error_type = "permission_error"


class NotFound(RaglineError):
    status_code = 404
    error_type = "not_found_error"


class ModelNotFound(NotFound):
    error_type = "invalid_request_error"
    default_code = "model_not_found"


class PayloadTooLarge(RaglineError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "payload_too_large"


class RateLimited(RaglineError):
    status_code = 429
    error_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class Overloaded(RaglineError):
    status_code = 503
    error_type = "server_overloaded"
    default_code = "overloaded"
    retryable = True

    def __init__(self, message: str, *, retry_after: int = 1, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.headers.setdefault("Retry-After", str(retry_after))


class RouteUnavailable(RaglineError):
    """A route's configuration names something that does not exist (a vector store not
    ingested yet): the operator's problem, not the client's; ``/ready`` says so too."""

    status_code = 503
    error_type = "server_error"
    default_code = "route_unavailable"

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.headers.setdefault("Retry-After", "30")


class BackendError(RaglineError):
    status_code = 502
    error_type = "server_error"
    default_code = "backend_error"
    retryable = True


class InvalidOutput(RaglineError):
    """The model's answer breaks the request's contract (a tool call's arguments or a
    ``json_schema`` answer that does not validate): not passed on to the client."""

    status_code = 502
    error_type = "server_error"
    default_code = "invalid_model_output"


class UpstreamError(RaglineError):
    """An upstream's 4xx, passed on with its own status and fields."""

    def __init__(self, status: int, message: str, *, error_type: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.status_code = status
        self.error_type = error_type


class ModelAssetError(RaglineError):
    """Fetching, converting or verifying model files failed; raised by ``ragline models``."""


_STORE_ERROR_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    409: "invalid_request_error",
}


def library_errors() -> tuple[type[Exception], ...]:
    """The library error types ``as_ragline_error`` maps."""
    from prompts.template import PromptError
    from rag.loaders import LoaderError
    from rag.snapshot import StoreError

    return StoreError, LoaderError, PromptError


def as_ragline_error(exc: BaseException) -> RaglineError | None:
    """The one mapping from the errors of the libraries ragline uses (vector stores, file
    loaders, prompt templates) to ours; None for anything else (a bug: 500)."""
    if isinstance(exc, RaglineError):
        return exc
    from prompts.template import PromptError
    from rag.loaders import LoaderError
    from rag.snapshot import StoreError

    mapped: RaglineError
    if isinstance(exc, StoreError):
        mapped = RaglineError(exc.message, param=exc.param, code=exc.code)
        mapped.status_code = exc.status
        mapped.error_type = _STORE_ERROR_TYPES.get(exc.status, "server_error")
    elif isinstance(exc, LoaderError):
        mapped = InvalidRequest(exc.message, param="file", code=exc.code)
    elif isinstance(exc, PromptError):
        mapped = InvalidRequest(exc.message, param=exc.param or "ragline.template")
    else:
        return None
    mapped.__cause__ = exc
    return mapped
