"""Helpers every resource uses: links, request bodies, field selection, pagination."""
from __future__ import annotations

import uuid as uuidlib
from datetime import datetime
from typing import Any, Iterable
from urllib.parse import urlencode

from flask import g, request
from sqlalchemy import Select, and_, func, or_, select
from sqlalchemy.orm import Session

from labmetal.api.errors import bad_request, not_found
from labmetal.models import Node

MAX_LIMIT = 1000


def base_url() -> str:
    from labmetal.api.app import services
    return (services().settings.public_url or request.host_url).rstrip("/")


def links(kind: str, ident: str) -> list[dict[str, str]]:
    base = base_url()
    return [{"href": f"{base}/v1/{kind}/{ident}", "rel": "self"},
            {"href": f"{base}/{kind}/{ident}", "rel": "bookmark"}]


def isotime(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat() + "+00:00"


def json_object() -> dict[str, Any]:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object")
    return body


def json_list() -> list[Any]:
    body = request.get_json(silent=True)
    if not isinstance(body, list):
        raise bad_request("The request body must be a JSON list of patch operations")
    return body


def caller_name() -> str | None:
    return g.caller.name


def is_uuid(value: str) -> bool:
    try:
        return str(uuidlib.UUID(value)) == value.lower()
    except ValueError:
        return False


def find_node(session: Session, ident: str) -> Node:
    column = Node.uuid if is_uuid(ident) else Node.name
    node = session.scalar(select(Node).where(column == (ident.lower() if is_uuid(ident) else ident)))
    if node is None:
        raise not_found(f"Node {ident} could not be found.")
    return node


def requested_fields(valid: Iterable[str]) -> list[str] | None:
    raw = request.args.get("fields")
    if not raw:
        return None
    fields = [name.strip() for name in raw.split(",") if name.strip()]
    unknown = [name for name in fields if name not in valid]
    if unknown:
        raise bad_request(f"Field(s) \"{', '.join(unknown)}\" are not valid")
    return fields


def select_fields(view: dict[str, Any], fields: list[str] | None) -> dict[str, Any]:
    if fields is None:
        return view
    return {name: view[name] for name in fields} | {"links": view["links"]}


def boolean_arg(name: str) -> bool | None:
    raw = request.args.get(name)
    if raw is None:
        return None
    if raw.lower() in ("true", "1", "yes", "on"):
        return True
    if raw.lower() in ("false", "0", "no", "off"):
        return False
    raise bad_request(f"Invalid value for {name}: {raw!r} is not a boolean")


def page(session: Session, statement: Select, model: Any,
         sort_keys: Iterable[str]) -> tuple[list[Any], dict[str, str]]:
    """Apply limit/marker/sort_key/sort_dir; returns the rows and a ``next`` link when the
    page is full (Ironic's contract)."""
    try:
        limit = int(request.args.get("limit", 0))
    except ValueError:
        raise bad_request("limit must be an integer") from None
    if limit < 0:
        raise bad_request("limit must be positive")
    limit = min(limit or MAX_LIMIT, MAX_LIMIT)
    sort_key = request.args.get("sort_key", "id")
    sort_dir = request.args.get("sort_dir", "asc")
    if sort_key not in sort_keys:
        raise bad_request(f"The sort_key value \"{sort_key}\" is an invalid field for sorting; "
                          f"use one of {', '.join(sorted(sort_keys))}")
    if sort_dir not in ("asc", "desc"):
        raise bad_request(f"Invalid sort direction: {sort_dir}. Acceptable values are 'asc' or "
                          "'desc'")
    column = getattr(model, sort_key)
    if sort_key in ("name",):
        column = func.coalesce(column, "")
    marker = request.args.get("marker")
    if marker:
        anchor = session.scalar(select(model).where(model.uuid == marker))
        if anchor is None:
            raise bad_request(f"Marker {marker} could not be found")
        anchor_value = session.scalar(select(column).where(model.id == anchor.id))
        after = column > anchor_value if sort_dir == "asc" else column < anchor_value
        same = and_(column == anchor_value,
                    model.id > anchor.id if sort_dir == "asc" else model.id < anchor.id)
        statement = statement.where(or_(after, same))
    order = (column.asc(), model.id.asc()) if sort_dir == "asc" else (column.desc(), model.id.desc())
    rows = list(session.scalars(statement.order_by(*order).limit(limit)))
    extra: dict[str, str] = {}
    if len(rows) == limit:
        args = {**request.args.to_dict(), "limit": str(limit), "marker": rows[-1].uuid}
        extra["next"] = f"{base_url()}{request.path}?{urlencode(args)}"
    return rows, extra
