"""Serving errors carry an HTTP status and a stable ``error_type``; one handler maps them to JSON."""

from __future__ import annotations


class ServingError(Exception):
    status_code = 500
    error_type = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ServingError):
    status_code = 400
    error_type = "bad_request"


class ModelNotFound(ServingError):
    status_code = 404
    error_type = "model_not_found"


class PayloadTooLarge(ServingError):
    status_code = 413
    error_type = "payload_too_large"


class NotReady(ServingError):
    status_code = 503
    error_type = "not_ready"


class FeedbackUnavailable(ServingError):
    status_code = 503
    error_type = "feedback_unavailable"


class ArtifactRejected(ServingError):
    """An artifact failed verification; it is never loaded. ``reason`` is a stable code."""

    status_code = 422
    error_type = "artifact_rejected"

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class Unauthorized(ServingError):
    status_code = 401
    error_type = "unauthorized"


class Forbidden(ServingError):
    status_code = 403
    error_type = "forbidden"


class NotFound(ServingError):
    status_code = 404
    error_type = "not_found"


class Conflict(ServingError):
    status_code = 409
    error_type = "conflict"
