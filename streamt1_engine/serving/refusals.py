"""How a refused request is answered: one HTTP status and one line, ``{"error": ..., "status": ...}``."""
from __future__ import annotations

from pydantic import ValidationError

from ..errors import EngineBusy, StreamT1Error
from .limits import LimitExceeded
from .schemas import ErrorResponse

ERROR_RESPONSES = {code: {"model": ErrorResponse, "description": text} for code, text in (
    (400, "body is not valid JSON, or the Host header does not name this server"),
    (401, "the server's API key is missing or wrong"), (403, "a page of a foreign Origin"),
    (413, "body over the server's size limit"),
    (422, "a field is refused (the engine's checks, or the server's chunk / candidate limits)"),
    (429, "the server's stream limit is reached"), (503, "the engine's queue is full"),
    (500, "the stream failed while generating"))}


class ApiError(Exception):
    """A refusal answered as ``{"error", "status"}``; ``counted``: already in the request metrics."""

    def __init__(self, status: int, message: str, counted: bool = False):
        super().__init__(message)
        self.status, self.message, self.counted = status, message, counted


def classify(exc: BaseException) -> ApiError:
    """The HTTP status and one-line message for a refused request."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, LimitExceeded):
        return ApiError(exc.status, str(exc))
    if isinstance(exc, EngineBusy):  # the engine's state, not the request's fault
        return ApiError(503, str(exc))
    if isinstance(exc, StreamT1Error):
        return ApiError(422, str(exc))
    if isinstance(exc, ValidationError):
        return ApiError(422, validation_message(exc.errors()))
    return ApiError(500, f"{type(exc).__name__}: {exc}")


def validation_message(errors) -> str:
    """pydantic's errors as one line: ``field.path: message`` joined by '; '."""
    parts = []
    for e in errors:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return "; ".join(parts) or "invalid request"


def outcome_of(status: int) -> str:
    return "rejected" if status in (429, 503) else "invalid" if status < 500 else "failed"
