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


def error_response(status: int, message: str) -> Response:
    fault = {"faultstring": message, "faultcode": "Client" if status < 500 else "Server",
             "debuginfo": None}
    body = json.dumps({"error_message": json.dumps(fault)})
    return Response(body, status=status, mimetype="application/json")
