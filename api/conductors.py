"""GET /v1/conductors (Ironic API 1.49 and later)."""
from __future__ import annotations

from typing import Any

from flask import Blueprint, g
from sqlalchemy import select

from labmetal.api.services import services
from labmetal.api.auth import authorize
from labmetal.api.common import isotime, links
from labmetal.api.errors import not_found
from labmetal.api.validation import DETAIL, query
from labmetal.models import Conductor

blueprint = Blueprint("conductors", __name__)
SINCE = (1, 49)


def _view(row: Conductor, live: set[str], detail: bool) -> dict:
    view = {"hostname": row.hostname, "conductor_group": "", "alive": row.hostname in live,
            "links": links("conductors", row.hostname)}
    if detail:
        view.update(drivers=row.drivers.get("names", []), created_at=isotime(row.created_at),
                    updated_at=isotime(row.heartbeat_at))
    return view


def _require_version() -> None:
    if g.version < SINCE:
        raise not_found("The conductors endpoint needs API version 1.49 or later")


@blueprint.get("/v1/conductors")
@authorize("conductor:get")
@query(DETAIL)
def list_conductors(query: dict[str, Any]):
    _require_version()
    detail = query["detail"]
    live = set(services().registry.live(force=True))
    with services().db.read() as session:
        rows = session.scalars(select(Conductor).order_by(Conductor.hostname)).all()
    return {"conductors": [_view(row, live, detail) for row in rows]}


@blueprint.get("/v1/conductors/<hostname>")
@authorize("conductor:get")
def show_conductor(hostname: str):
    _require_version()
    with services().db.read() as session:
        row = session.scalar(select(Conductor).where(Conductor.hostname == hostname))
    if row is None:
        raise not_found(f"Conductor {hostname} could not be found.")
    return _view(row, set(services().registry.live(force=True)), detail=True)
