"""`GET /`: a browser is sent to the web pages, API clients get Ironic's version document."""
from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from labmetal.api.app import Services, create_app
from labmetal.config import Settings
from labmetal.db import Database
from labmetal.secrets import SecretBox

pytestmark = pytest.mark.fast

FIREFOX = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
CHROMIUM = ("text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,"
            "image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7")


@pytest.fixture(params=["noauth", "http_basic"])
def client(request, tmp_path: Path):
    """The application as `labmetal serve` builds it, without and with authentication."""
    settings = Settings(auth=request.param, state_dir=tmp_path)
    app = create_app(Services(settings, Database(f"sqlite:///{tmp_path / 'root.db'}"), None,
                              None, {}, SecretBox(Fernet.generate_key())))
    return app.test_client()


@pytest.mark.parametrize("accept", [FIREFOX, CHROMIUM, "text/html"])
def test_a_browser_opening_the_root_is_sent_to_the_pages(client, accept):
    response = client.get("/", headers={"Accept": accept})
    assert response.status_code in (302, 303), response.data[:300]
    assert response.headers["Location"] == "/ui/"
    assert client.get("/ui/", headers={"Accept": accept}).status_code in (302, 303)


@pytest.mark.parametrize("accept", [None, "*/*", "application/json",
                                    "application/json, text/html",
                                    "text/html;q=0.5, application/json"])
def test_api_clients_still_get_the_version_document(client, accept):
    """The Ironic client sends Accept: application/json, `requests` */*, curl */*."""
    headers = {"Accept": accept} if accept else {}
    response = client.get("/", headers=headers)
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    document = response.get_json()
    assert document["default_version"]["id"] == "v1"
    assert [version["id"] for version in document["versions"]] == ["v1"]
    assert document == client.get("/").get_json()  # whatever the Accept header says
