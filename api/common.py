"""Helpers every resource uses: links, times, finding a node, field selection, pagination."""
from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from flask import g, request
from sqlalchemy import Select, and_, func, or_, select
from sqlalchemy.orm import Session

from labmetal.api.errors import bad_request
from labmetal.conductor.door import Asker

MAX_LIMIT = 1000


def base_url() -> str:
    from labmetal.api.services import services
    return (services().settings.public_url or request.host_url).rstrip("/")


def links(kind: str, ident: str) -> list[dict[str, str]]:
    base = base_url()
    return [{"href": f"{base}/v1/{kind}/{ident}", "rel": "self"},
            {"href": f"{base}/{kind}/{ident}", "rel": "bookmark"}]


def isotime(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat() + "+00:00"


def caller_name() -> str | None:
    return g.caller.name


def asker() -> Asker:
    """The caller, as the doors record who asked (conductor/door.py)."""
    return Asker(user=caller_name())


def select_fields(view: dict[str, Any], fields: list[str] | None) -> dict[str, Any]:
    if fields is None:
        return view
    return {name: view[name] for name in fields} | {"links": view["links"]}


def page(session: Session, statement: Select, model: Any,
         query: dict[str, Any]) -> tuple[list[Any], dict[str, str]]:
    """Apply limit/marker/sort_key/sort_dir (checked by api/validation.paging); returns the
    rows and a ``next`` link when the page is full (Ironic's contract)."""
    limit = min(query.get("limit") or MAX_LIMIT, MAX_LIMIT)
    sort_key, sort_dir = query["sort_key"], query["sort_dir"]
    column = getattr(model, sort_key)
    if sort_key in ("name",):
        column = func.coalesce(column, "")
    marker = query.get("marker")
    if marker:
        anchor = session.scalar(select(model).where(model.uuid == marker))
        if anchor is None:
            raise bad_request(f"Marker {marker} could not be found")
        anchor_value = session.scalar(select(column).where(model.id == anchor.id))
        after = column > anchor_value if sort_dir == "asc" else column < anchor_value
        same = and_(column == anchor_value,
                    model.id > anchor.id if sort_dir == "asc" else model.id < anchor.id)
        statement = statement.where(or_(after, same))
    order = ((column.asc(), model.id.asc()) if sort_dir == "asc"
             else (column.desc(), model.id.desc()))
    rows = list(session.scalars(statement.order_by(*order).limit(limit)))
    extra: dict[str, str] = {}
    if len(rows) == limit:
        args = {**request.args.to_dict(), "limit": str(limit), "marker": rows[-1].uuid}
        extra["next"] = f"{base_url()}{request.path}?{urlencode(args)}"
    return rows, extra
