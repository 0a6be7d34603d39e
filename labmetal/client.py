"""How the labmetal CLIs reach the API: the URL and credentials, and the server's errors.

The API is found with ``--url`` or ``LABMETAL_URL``; HTTP basic credentials come from
``LABMETAL_USER`` and ``LABMETAL_PASSWORD`` when set (never from the command line, where
other users of the machine would see them). Otherwise the token `labmetal login` saved is
used, for the URL it was issued by (the default URL then).
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from typing import Any

import requests

from labmetal.profile import load_profile

DEFAULT_URL = "http://127.0.0.1:6385"


class CliError(Exception):
    """A failure to show the user as it is: usually the server's own message."""


@dataclass
class Client:
    url: str
    auth: tuple[str, str] | None
    token: str | None = None  # an API token, sent as X-Auth-Token

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        if self.token:
            kwargs["headers"] = {**kwargs.get("headers", {}), "X-Auth-Token": self.token}
        try:
            response = requests.request(method, self.url.rstrip("/") + path, auth=self.auth,
                                        timeout=(10, 3600), **kwargs)
        except requests.RequestException as error:
            reason = getattr(error.args[0] if error.args else None, "reason", error)
            raise CliError(f"cannot reach the labmetal API at {self.url}: {reason}") from None
        if not response.ok:
            raise CliError(server_message(response))
        return response.json() if response.content else None


def server_message(response: requests.Response) -> str:
    """The faultstring inside Ironic's double-encoded error body, or the body itself."""
    try:
        return json.loads(response.json()["error_message"])["faultstring"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text.strip() or response.reason}"


def make_client(url: str | None) -> Client:
    """Basic credentials from the environment, else the login profile's token when it was
    issued by this URL (a token is never sent to another server)."""
    user, password = os.environ.get("LABMETAL_USER"), os.environ.get("LABMETAL_PASSWORD")
    if user:
        return Client(url or DEFAULT_URL, (user, password or ""))
    profile = load_profile()
    url = url or (profile.url if profile else DEFAULT_URL)
    same = profile is not None and profile.url.rstrip("/") == url.rstrip("/")
    return Client(url, None, profile.token if same else None)


def common_options() -> argparse.ArgumentParser:
    """--url and --json, shared by every subcommand that talks to the API."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("LABMETAL_URL"),
                        help=f"the labmetal API (default: $LABMETAL_URL, the URL of "
                             f"`labmetal login`, or {DEFAULT_URL})")
    common.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return common
