"""What the front (nginx, labmetal/front.py) asks the API before it reads an upload's body.

An image upload may be gigabytes; nginx must not take any of it from a caller who may not
upload (DESIGN §11: an anonymous seat streaming 10 GiB). So before it reads the body of
``PUT /v1/images/<id>/data`` nginx sends this view the request's head (its credentials,
not its body) with ``auth_request``: the usual authentication runs first, as for every
request (401), then the policy check of ``image:upload`` (403). 204 lets the body through;
the upload view then checks the image itself (exists, not active yet) at once, without
reading the body.

``auth_request`` passes 2xx, 401 and 403 on, and drops a refusal's body: so the body (the
API's usual message) goes back in the ``X-Labmetal-Error`` header for nginx to answer with,
and any other refusal (429 while password guesses are slowed) becomes 403 with its message.
"""
from __future__ import annotations

import json

from flask import Blueprint, Response

from labmetal.api.auth import authorize

blueprint = Blueprint("front_check", __name__)
ERROR_HEADER = "X-Labmetal-Error"  # labmetal/front.py reads it


@blueprint.get("/v1/auth/check-upload")
@authorize("image:upload")
def check_upload():
    """204: the caller may upload image data; the front then lets the body through."""
    return "", 204


@blueprint.after_request
def refusal_for_the_front(response: Response) -> Response:
    """Runs on this blueprint's answers, refusals made before the view included."""
    if response.status_code < 300:
        return response
    try:
        body = json.dumps(json.loads(response.get_data()))  # one line, ASCII
    except ValueError:
        body = json.dumps({"error_message": response.get_data(as_text=True)[:500]})
    response.headers[ERROR_HEADER] = body
    if response.status_code not in (401, 403):
        response.status_code = 403
    return response
