"""The documents that describe the API: GET / and GET /v1 (versions, public as in Ironic)
and GET /v1/openapi.json (every endpoint, built from the routes and their checks).

A browser asking for ``/`` (it prefers text/html to JSON) never reaches the view here: it is
sent to the web pages (``/ui/``) by pages.py's ``browsers_start_at_the_pages``."""
from __future__ import annotations

from flask import Blueprint, current_app

from labmetal.api import microversion
from labmetal.api.auth import public
from labmetal.api.common import base_url
from labmetal.api.openapi import document as openapi_document

blueprint = Blueprint("root", __name__)


def _version() -> dict:
    return {"id": "v1", "links": [{"href": f"{base_url()}/v1/", "rel": "self"}],
            "status": "CURRENT", "min_version": microversion.text(microversion.MIN_VERSION),
            "version": microversion.text(microversion.MAX_VERSION)}


@blueprint.get("/")
@public("version discovery, as in Ironic")
def root():
    return {"name": "labmetal (OpenStack Ironic API compatible)",
            "description": "Bare-metal provisioning for teaching labs. The /v1 API follows "
                           "Ironic's for nodes, ports, drivers and conductors.",
            "versions": [_version()], "default_version": _version()}


@blueprint.get("/v1")
@blueprint.get("/v1/")
@public("version discovery, as in Ironic")
def v1():
    base = base_url()
    document = {"id": "v1", "links": [{"href": f"{base}/v1/", "rel": "self"}],
                "media_types": [{"base": "application/json",
                                 "type": "application/vnd.openstack.ironic.v1+json"}],
                "version": _version()}
    for collection in ("nodes", "ports", "drivers", "conductors"):
        document[collection] = [{"href": f"{base}/v1/{collection}/", "rel": "self"},
                                {"href": f"{base}/{collection}/", "rel": "bookmark"}]
    return document


@blueprint.get("/v1/openapi.json")
@public("describes the API, like the version documents")
def openapi():
    """This document: the OpenAPI description of every endpoint."""
    return openapi_document(current_app, base_url())
