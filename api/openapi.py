"""The OpenAPI 3.1 document of the API, built at request time from the application itself:
every rule of its URL map with every method, the path parameters from the rules'
converters, and what each view declares (api/validation.py: body, query, media types;
api/auth.py: policy action or public reason). Nothing is written by hand, so a route or a
check cannot change without the document changing with it."""
from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from flask import Flask
from werkzeug.routing import Rule
from werkzeug.routing.rules import parse_converter_args

from labmetal.api import microversion
from labmetal.api.services import SESSION_COOKIE
from labmetal.api.auth import CSRF_HEADER
from labmetal.api.validation import JSON, RequestBody, schema

OPENAPI = "3.1.0"
IGNORED_METHODS = {"HEAD", "OPTIONS"}
_VARIABLE = re.compile(r"<(?:(?P<converter>\w+)(?:\((?P<args>.*?)\))?:)?(?P<name>\w+)>")
_CONVERTED: dict[str, dict[str, Any]] = {
    "default": {"type": "string"}, "string": {"type": "string"},
    "path": {"type": "string", "description": "may contain slashes"},
    "uuid": {"type": "string", "format": "uuid"}, "int": {"type": "integer"},
    "float": {"type": "number"}}
_SCHEMES = ("basic", "token", "bearer", "session")
_ERROR = {"$ref": "#/components/responses/Error"}


def document(app: Flask, server: str | None = None) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    operation_ids: set[str] = set()
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        view = app.view_functions[rule.endpoint]
        path, parameters = _path(rule)
        for method in sorted((rule.methods or set()) - IGNORED_METHODS):
            operation = _operation(view, rule, method, parameters)
            operation["operationId"] = _unique(rule.endpoint.replace(".", "_"), operation_ids)
            paths.setdefault(path, {})[method.lower()] = operation
    return {
        "openapi": OPENAPI,
        "info": {"title": "labmetal", "version": _version(),
                 "description": "Bare-metal provisioning for teaching labs. The /v1 API "
                                "follows OpenStack Ironic's (microversions "
                                f"{microversion.text(microversion.MIN_VERSION)} to "
                                f"{microversion.text(microversion.MAX_VERSION)}); errors "
                                "are Ironic's {\"error_message\": ...}. With auth = noauth "
                                "no credentials are needed."},
        **({"servers": [{"url": server}]} if server else {}),
        "tags": _tags(app, paths),
        "paths": paths,
        "components": _components(),
        "security": [{name: []} for name in _SCHEMES],
    }


def _path(rule: Rule) -> tuple[str, list[dict[str, Any]]]:
    """The rule as an OpenAPI path, and its parameters from the converters."""
    parameters = []
    for match in _VARIABLE.finditer(rule.rule):
        converter = match.group("converter") or "default"
        if converter == "any":
            value_schema: dict[str, Any] = {"type": "string", "enum": list(
                parse_converter_args(match.group("args") or "")[0])}
        else:
            value_schema = dict(_CONVERTED.get(converter, {"type": "string"}))
        parameters.append({"name": match.group("name"), "in": "path", "required": True,
                           "schema": value_schema})
    return _VARIABLE.sub(lambda m: "{" + m.group("name") + "}", rule.rule), parameters


def _operation(view: Callable, rule: Rule, method: str,
               path_parameters: list[dict[str, Any]]) -> dict[str, Any]:
    action = getattr(view, "policy_action", None)
    public = getattr(view, "public_reason", None)
    body: RequestBody | None = getattr(view, "request_body", None)
    query = getattr(view, "query_params", ())
    notes = [inspect.getdoc(view) or ""]
    if action:
        notes.append(f"Policy action: `{action}`.")
    if public:
        notes.append(f"Public: {public}.")
    parameters = list(path_parameters)
    if rule.rule.startswith("/v1"):
        parameters.append({"$ref": "#/components/parameters/ApiVersion"})
    for field in query:
        value_schema = schema(field)
        description = value_schema.pop("description", None)
        parameters.append({"name": field.name, "in": "query", "required": field.required,
                           **({"description": description} if description else {}),
                           "schema": value_schema,
                           **({"style": "form", "explode": False}  # a,b,c
                              if value_schema.get("type") == "array" else {})})
    responses: dict[str, Any] = {"2XX": {"description": "Success (200, 201 created, 202 "
                                                        "accepted, 204 no content or a "
                                                        "redirect for pages)",
                                         "content": {media: {} for media in getattr(
                                             view, "produces", (JSON,))}}}
    if body is not None or query:
        responses["400"] = _ERROR
    if action:
        responses["401"] = _ERROR
        responses["403"] = _ERROR
    responses["default"] = _ERROR
    operation: dict[str, Any] = {
        "tags": [rule.endpoint.split(".")[0]],
        "summary": view.__name__.replace("_", " ").strip().capitalize(),
        "description": "\n\n".join(note for note in notes if note),
        "parameters": parameters,
        "responses": responses,
    }
    if body is not None:
        operation["requestBody"] = _request_body(body)
    if action:
        operation["x-policy-action"] = action
    if public:
        operation["x-public"] = public
        operation["security"] = [{}] + [{name: []} for name in _SCHEMES]
    return operation


def _request_body(body: RequestBody) -> dict[str, Any]:
    if body.spec is None:
        content: dict[str, Any] = {media: {} for media in body.media_types}
    else:
        content = {media: {"schema": {"title": body.spec.name, **schema(body.spec)}}
                   for media in body.media_types}
    description = body.description or (body.spec.description if body.spec else "")
    return {"required": body.required, "content": content,
            **({"description": description} if description else {})}


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}_{n}"
    taken.add(candidate)
    return candidate


def _tags(app: Flask, paths: dict[str, dict[str, Any]]) -> list[dict[str, str]]:
    """One tag per blueprint, described by the first paragraph of its module's docstring."""
    used = sorted({op["tags"][0] for item in paths.values() for op in item.values()})
    tags = []
    for name in used:
        blueprint = app.blueprints.get(name)
        module = sys.modules.get(blueprint.import_name) if blueprint else None
        doc = inspect.getdoc(module) if module else None
        tags.append({"name": name, **({"description": " ".join(doc.split("\n\n")[0].split())}
                                      if doc else {})})
    return tags


def _components() -> dict[str, Any]:
    return {
        "securitySchemes": {
            "basic": {"type": "http", "scheme": "basic",
                      "description": "a labmetal user's name and password (local or LDAP)"},
            "token": {"type": "apiKey", "in": "header", "name": "X-Auth-Token",
                      "description": "an API token (POST /v1/auth/tokens, labmetal login)"},
            "bearer": {"type": "http", "scheme": "bearer",
                       "description": "the same API token as Authorization: Bearer"},
            "session": {"type": "apiKey", "in": "cookie", "name": SESSION_COOKIE,
                        "description": "the web login's session (POST /login); a request "
                                       "that changes anything must also send the session's "
                                       f"CSRF token (GET /v1/auth/session) in {CSRF_HEADER}"},
        },
        "parameters": {
            "ApiVersion": {"name": microversion.HEADER, "in": "header", "required": False,
                           "description": "the Ironic API microversion wanted (default "
                                          f"{microversion.text(microversion.MIN_VERSION)})",
                           "schema": {"type": "string", "pattern": r"^(latest|\d+\.\d+)$"}},
        },
        "schemas": {
            "Error": {"type": "object", "required": ["error_message"],
                      "properties": {"error_message": {
                          "type": "string", "description": "JSON text of {faultstring, "
                                                           "faultcode, debuginfo}"}}},
        },
        "responses": {
            "Error": {"description": "An error, in Ironic's format",
                      "content": {JSON: {"schema": {"$ref": "#/components/schemas/Error"}}}},
        },
    }


def _version() -> str:
    try:
        return version("labmetal")
    except PackageNotFoundError:
        return "0"
