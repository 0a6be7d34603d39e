"""The OpenAPI document through the real service: requests made from it are accepted, and a
client that breaks a declared rule hears which one (the document itself: tests/test_openapi.py)."""
from __future__ import annotations

import pytest

from labmetal.lab.harness import error_text, start_service
from tests.test_openapi import JSON, example


@pytest.fixture
def service(procs):
    return start_service(procs, "openapi")


def test_requests_made_from_the_document_are_accepted(service):
    paths = service.get("/v1/openapi.json").json()["paths"]
    for path in ("/v1/nodes", "/v1/rooms", "/v1/images"):
        schema = paths[path]["post"]["requestBody"]["content"][JSON]["schema"]
        created = service.post(path, example(schema))
        assert created.status_code == 201, (path, created.text)


def test_a_broken_rule_is_a_400_that_names_the_field(service):
    def refused(response) -> str:
        assert response.status_code == 400, response.text
        return error_text(response)

    assert refused(service.post("/v1/nodes", {"name": "pc1"})) == \
        "Mandatory field missing: driver (the hardware type: one of GET /v1/drivers)"
    assert refused(service.post("/v1/nodes", {"driver": "wol", "description": 5})) == \
        "Invalid description: expected a string or null"
    unknown = refused(service.post("/v1/nodes", {"driver": "wol", "colour": "red", "size": 2}))
    assert unknown.startswith("Unknown attribute(s) for a new node: colour, size; accepted: "
                              "driver, name, ")
    # checked before the view runs: the room does not exist, the type is still what is told
    assert refused(service.post("/v1/rooms/nowhere/jobs", {"retries": "3"})) == \
        "Invalid retries '3': a whole number from 0 to 10"
    assert refused(service.post("/v1/rooms", None, data="name=x")) == \
        "The request body must be a JSON object"
    assert refused(service.patch("/v1/nodes/pc1", {"op": "replace"})) == \
        "The request body must be a JSON list of patch operations"
    assert refused(service.get("/v1/nodes?maintenance=perhaps")) == \
        "Invalid maintenance 'perhaps': expected true or false"
    assert refused(service.get("/v1/lookup")).startswith(
        "Mandatory query parameter missing: addresses")

