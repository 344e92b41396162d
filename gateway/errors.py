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
    ├── BackendError                  502 upstream failure
    └── ModelAssetError               (command line only) fetching or converting a model failed

Every error carries ``message``, ``type``, ``param`` and ``code`` exactly as OpenAI's error body
does; ``headers`` adds response headers such as ``Retry-After``.
"""

from __future__ import annotations

from typing import Any


class RaglineError(Exception):
    status_code = 500
    error_type = "server_error"
    default_code: str | None = None

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

    def __init__(self, message: str, *, retry_after: int = 1, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.headers.setdefault("Retry-After", str(retry_after))


class BackendError(RaglineError):
    status_code = 502
    error_type = "server_error"
    default_code = "backend_error"


class ModelAssetError(RaglineError):
    """Fetching, converting or verifying model files failed; raised by ``ragline models``."""
