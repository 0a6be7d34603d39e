"""The OpenAPI document: valid, listing every route of the real application, and saying what
the request checks enforce (through a real service: tests/test_openapi_service.py)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi

from labmetal.api.app import Services, create_app
from labmetal.api.errors import ApiError
from labmetal.api.openapi import document
from labmetal.api.validation import validate
from labmetal.config import Settings
from labmetal.db import Database
from labmetal.secrets import SecretBox

pytestmark = pytest.mark.fast  # the real service's answers: tests/test_openapi_service.py

JSON = "application/json"


def real_app(tmp_path: Path):
    """The application as `labmetal serve` builds it, with authentication on."""
    settings = Settings(auth="http_basic", state_dir=tmp_path)
    return create_app(Services(settings, Database(f"sqlite:///{tmp_path / 'doc.db'}"), None,
                               None, {}, SecretBox(Fernet.generate_key())))


def routes(app) -> list[tuple[str, str, Any]]:
    """(OpenAPI path, method, view) of every rule and method of the URL map."""
    return [(re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule), method.lower(),
             app.view_functions[rule.endpoint])
            for rule in app.url_map.iter_rules()
            for method in rule.methods - {"HEAD", "OPTIONS"}]


def test_the_document_is_valid_openapi_and_public(tmp_path):
    app = real_app(tmp_path)
    response = app.test_client().get("/v1/openapi.json")  # no credentials
    assert response.status_code == 200
    validate_openapi(response.json)
    assert response.json["servers"] == [{"url": "http://localhost"}]
    schemes = response.json["components"]["securitySchemes"]
    assert {(s["type"], s.get("scheme") or s["in"]) for s in schemes.values()} == {
        ("http", "basic"), ("http", "bearer"), ("apiKey", "header"), ("apiKey", "cookie")}


def test_every_route_and_method_is_in_the_document_with_its_policy_and_body(tmp_path):
    app = real_app(tmp_path)
    paths = document(app)["paths"]
    expected = routes(app)
    documented = {(path, method) for path, item in paths.items() for method in item}
    assert documented == {(path, method) for path, method, _ in expected}
    for path, method, view in expected:
        operation = paths[path][method]
        assert operation.get("x-policy-action") == getattr(view, "policy_action", None)
        assert operation.get("x-public") == getattr(view, "public_reason", None)
        assert ("requestBody" in operation) == hasattr(view, "request_body"), (path, method)
    nodes = paths["/v1/nodes"]["post"]["requestBody"]["content"][JSON]["schema"]
    assert nodes["required"] == ["driver"] and nodes["additionalProperties"] is False
    assert "text/html" in paths["/ui/{name}"]["get"]["responses"]["2XX"]["content"]
    assert {p.get("name") for p in paths["/v1/nodes"]["get"]["parameters"]} >= {
        "fields", "limit", "marker", "sort_key", "sort_dir", "maintenance"}


def test_a_route_added_later_is_documented_without_writing_anything(tmp_path):
    app = real_app(tmp_path)
    app.add_url_rule("/v1/gadgets/<int:number>", "gadget", lambda number: {}, methods=["PUT"])
    operation = document(app)["paths"]["/v1/gadgets/{number}"]["put"]
    assert operation["parameters"][0] == {"name": "number", "in": "path", "required": True,
                                          "schema": {"type": "integer"}}


# -- the schemas say what the checks enforce ----------------------------------------------
def example(schema: dict[str, Any]) -> Any:
    """The smallest request the schema asks for: its required fields, with their examples."""
    if "examples" in schema:
        return schema["examples"][0]
    if "default" in schema:
        return schema["default"]
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type")
    kind = kind[0] if isinstance(kind, list) else kind
    if kind == "object":
        return {name: example(schema["properties"][name]) for name in schema.get("required", [])}
    if kind == "array":
        return [example(schema["items"])] * schema.get("minItems", 0)
    return {"string": "x", "integer": 1, "number": 1.5, "boolean": True, "null": None}.get(kind)


def wrong_type(schema: dict[str, Any]) -> Any:
    allowed = schema["type"]
    allowed = {allowed} if isinstance(allowed, str) else set(allowed)
    if "number" in allowed:
        allowed.add("integer")
    return next(value for value, kind in ((12345, "integer"), ("text", "string"),
                                          (True, "boolean"), (None, "null"), ([], "array"),
                                          ({}, "object")) if kind not in allowed)


def declared_bodies(app) -> list[tuple[str, Any, dict[str, Any]]]:
    paths = document(app)["paths"]
    return [(f"{method.upper()} {path}", view.request_body.spec,
             paths[path][method]["requestBody"]["content"][JSON]["schema"])
            for path, method, view in routes(app)
            if getattr(view, "request_body", None) and view.request_body.spec is not None]


def agree(route: str, spec: Any, schema: dict[str, Any], instance: Any, valid: bool) -> None:
    """The schema and the check both take ``instance`` (valid) or both refuse it."""
    by_schema = Draft202012Validator(
        schema, format_checker=Draft202012Validator.FORMAT_CHECKER).is_valid(instance)
    try:
        validate(spec, instance)
        by_check = True
    except ApiError as error:
        assert error.status == 400
        by_check = False
    assert (by_schema, by_check) == (valid, valid), f"{route}: {instance!r}"


def test_each_body_schema_accepts_and_refuses_what_its_check_does(tmp_path):
    bodies = declared_bodies(real_app(tmp_path))
    assert len(bodies) >= 15
    for route, spec, schema in bodies:
        request = example(schema)
        agree(route, spec, schema, request, True)
        agree(route, spec, schema, "not an object", False)
        if schema["type"] != "object":
            continue
        for name in schema.get("required", []):
            agree(route, spec, schema,
                  {key: value for key, value in request.items() if key != name}, False)
        for name, field in schema["properties"].items():
            if "type" in field:
                agree(route, spec, schema, {**request, name: wrong_type(field)}, False)
        agree(route, spec, schema, {**request, "no_such_attribute": 1},
              schema["additionalProperties"])
