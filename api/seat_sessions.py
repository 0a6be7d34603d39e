"""The endpoints a seat's ramdisk calls for its local session (issue 16): its token, its
plan, the student's blocks down, the overlay up (agent/session_sync.py on the seat,
conductor/seat_sync.py here, which says why each step is safe on a hostile seat network).

They are public like the deploy agent's (the seat holds no user's credentials); what
protects them is the seat's token for this boot, handed to the seat's leased address
only and required from it on every later call (header ``X-Labmetal-Seat-Token``).
"""
from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, request, stream_with_context
from sqlalchemy import select

from labmetal.agent import block_wire
from labmetal.api.auth import public
from labmetal.api.ports import mac_field
from labmetal.api.seat_address import caller_address, holds_lease, leases_known
from labmetal.api.services import services
from labmetal.api.validation import Field, body, obj, query, streams
from labmetal.models import Port

blueprint = Blueprint("seat_sessions", __name__)
TOKEN_HEADER = "X-Labmetal-Seat-Token"
PROTECTED = "a seat's ramdisk; protected by the seat's token, bound to its address"
CACHE = obj("a seat's cache", Field("cache_id", str, required=True, pattern="^[0-9a-f]{32}$",
                                        example="0123456789abcdef0123456789abcdef"),
            Field("start", int, required=True, minimum=1),
            Field("size", int, required=True, minimum=1), extra=True)


def _few_saves(labels: list[str]) -> list[str]:
    if len(labels) > 16:
        raise ValueError("at most 16 save points in one upload")
    return labels


UPLOADED = obj("an upload's end", Field("pieces", int, required=True, minimum=0),
               Field("digest", str, required=True, pattern="^[0-9a-f]{64}$",
                     example="0" * 64),
               Field("saves", list, default=[], check=_few_saves,
                     items=Field("label", str, max_length=64, pattern="^[^\\x00-\\x1f]+$"),
                     description="save points asked from inside the session OS, made "
                                 "from this upload"))
PROGRESS = obj("how far a seat is in fetching its room's template",
               Field("done", int, required=True, minimum=0),
               Field("total", int, required=True, minimum=1))
FAILED = obj("what went wrong", Field("message", str, required=True, max_length=500))
SESSION = "<uuid:session>"


def _few(macs: list[str]) -> list[str]:
    if len(macs) > 16:
        raise ValueError("at most 16 addresses")
    return macs


def _token() -> str | None:
    return request.headers.get(TOKEN_HEADER)


@blueprint.get("/v1/seat-sessions/lookup")
@public(PROTECTED)
@query(Field("addresses", list, required=True, min_items=1, check=_few,
             description="the seat's MAC addresses, comma-separated",
             items=mac_field("address", error="Invalid MAC address {value!r} in addresses")))
def lookup(query: dict[str, Any]):
    svc = services()
    address = caller_address()
    holder: bool | None = None
    if leases_known(svc.settings.boot):
        with svc.db.read() as session:
            port = session.scalar(select(Port).where(Port.address.in_(query["addresses"])))
            macs = [p.address for p in port.node.ports] if port is not None else []
            holder = bool(macs) and holds_lease(session, macs, address)
    return svc.seat_sync.lookup(query["addresses"], address, holder)


@blueprint.get("/v1/seat-sessions/<uuid:node>/plan")
@public(PROTECTED)
def plan(node):
    return services().seat_sync.plan(str(node), _token(), caller_address())


@blueprint.put("/v1/seat-sessions/<uuid:node>/cache")
@public(PROTECTED)
@body(CACHE)
def cache(node, body: dict[str, Any]):
    services().seat_sync.record(str(node), _token(), caller_address(), body)
    return "", 204


@blueprint.get(f"/v1/seat-sessions/<uuid:node>/sessions/{SESSION}/blocks")
@public(PROTECTED)
def blocks(node, session):
    stream = services().seat_sync.blocks(str(node), _token(), caller_address(), str(session))
    return Response(stream_with_context(stream), mimetype="application/octet-stream")


@blueprint.get(f"/v1/seat-sessions/<uuid:node>/sessions/{SESSION}/hashes")
@public(PROTECTED)
def hashes(node, session):
    """What the student's store holds, chunk by chunk, as it was sent to this seat."""
    listed = services().seat_sync.hashes(str(node), _token(), caller_address(), str(session))
    return Response(listed, mimetype="application/octet-stream")


@blueprint.post(f"/v1/seat-sessions/<uuid:node>/sessions/{SESSION}/pieces/<int:number>")
@public(PROTECTED)
@streams(lambda: block_wire.PIECE_RAW_MAX + block_wire.HEADER_MAX + 4096)
def piece(node, session, number: int):
    services().seat_sync.receive(str(node), _token(), caller_address(), str(session), number,
                                 request.stream)
    return "", 204


@blueprint.post(f"/v1/seat-sessions/<uuid:node>/sessions/{SESSION}/uploaded")
@public(PROTECTED)
@body(UPLOADED)
def uploaded(node, session, body: dict[str, Any]):
    services().seat_sync.uploaded(str(node), _token(), caller_address(), str(session),
                                  body["pieces"], body["digest"], body["saves"])
    return "", 204


@blueprint.post(f"/v1/seat-sessions/<uuid:node>/sessions/{SESSION}/ready")
@public(PROTECTED)
@body(CACHE)
def ready(node, session, body: dict[str, Any]):
    services().seat_sync.ready(str(node), _token(), caller_address(), str(session), body)
    return "", 204


@blueprint.put("/v1/seat-sessions/<uuid:node>/progress")
@public(PROTECTED)
@body(PROGRESS)
def progress(node, body: dict[str, Any]):
    services().seat_sync.progress(str(node), _token(), caller_address(), body["done"],
                                  body["total"])
    return "", 204


@blueprint.post("/v1/seat-sessions/<uuid:node>/filled")
@public(PROTECTED)
@body(CACHE)
def filled(node, body: dict[str, Any]):
    """The seat holds its room's TP template in its cache (a room opening a TP)."""
    services().seat_sync.filled(str(node), _token(), caller_address(), body)
    return "", 204


@blueprint.post("/v1/seat-sessions/<uuid:node>/failed")
@public(PROTECTED)
@body(FAILED)
def failed(node, body: dict[str, Any]):
    services().seat_sync.failed(str(node), _token(), caller_address(), body["message"])
    return "", 204
