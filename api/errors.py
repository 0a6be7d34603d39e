"""Errors in Ironic's format, so its client prints them: the body is
{"error_message": "<JSON text with faultstring, faultcode, debuginfo>"}."""
from __future__ import annotations

import json

from flask import Response

from labmetal.errors import (Conflict, Failed, Forbidden, InvalidRequest, NotFound,
                                       Refused, Unavailable)
from labmetal.images.overlays.base import OverlayError, Reason


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def bad_request(message: str) -> ApiError:
    return ApiError(400, message)


def not_found(message: str) -> ApiError:
    return ApiError(404, message)


def conflict(message: str) -> ApiError:
    return ApiError(409, message)


# The one place a domain refusal (labmetal/errors.py) becomes an HTTP status.
REFUSAL_STATUS: tuple[tuple[type[Refused], int], ...] = (
    (InvalidRequest, 400), (Forbidden, 403), (NotFound, 404), (Conflict, 409),
    (Unavailable, 503), (Failed, 500))
# The session store's refusals (images/overlays), by their reason.
OVERLAY_STATUS = {Reason.UNAVAILABLE: 503, Reason.QUOTA: 413, Reason.NOT_FOUND: 404,
                  Reason.BUSY: 409, Reason.INVALID: 400, Reason.FAILED: 500}


def from_refusal(error: Refused | OverlayError) -> ApiError:
    if isinstance(error, OverlayError):
        return ApiError(OVERLAY_STATUS.get(error.reason, 500), str(error))
    status = next((code for kind, code in REFUSAL_STATUS if isinstance(error, kind)), 500)
    return ApiError(status, error.message)


# What a 503 tells the client to wait before it asks again (RFC 9110 Retry-After): the
# database or a store is down for now; a client (the CLI, a seat) retries after it.
RETRY_AFTER = 5


def error_response(status: int, message: str) -> Response:
    fault = {"faultstring": message, "faultcode": "Client" if status < 500 else "Server",
             "debuginfo": None}
    body = json.dumps({"error_message": json.dumps(fault)})
    response = Response(body, status=status, mimetype="application/json")
    if status == 503:
        response.headers["Retry-After"] = str(RETRY_AFTER)
    return response


# What a database driver says when the database is away rather than the request wrong
# (psycopg, SQLite): anything else of that class (a missing table) is a bug, a 500.
_AWAY = ("could not connect", "connection", "server closed", "terminating", "starting up",
         "shutting down", "database is locked", "timeout", "timed out", "no route", "refused")


def database_away(error: Exception) -> bool:
    """Whether a database error means the database is unavailable for now."""
    if getattr(error, "connection_invalidated", False):
        return True
    text = str(getattr(error, "orig", None) or error).lower()
    return any(sign in text for sign in _AWAY)


def database_unavailable(error: Exception) -> ApiError:
    """The database did not answer (down, restarting, unreachable, its connections used
    up): a 503 that says so, never a generic 500; the caller's request may be sent again."""
    origin = getattr(error, "orig", None) or error
    said = str(origin).strip().splitlines()[0][:200] if str(origin).strip() else ""
    return ApiError(503, "The database is unavailable for now"
                         f"{f' ({type(origin).__name__}: {said})' if said else ''}; "
                         f"try again in {RETRY_AFTER} s")
