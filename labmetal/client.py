"""How the labmetal CLIs reach the API: the URL and credentials, and the server's errors.

The API is found with ``--url`` or ``LABMETAL_URL``; HTTP basic credentials come from
``LABMETAL_USER`` and ``LABMETAL_PASSWORD`` when set (never from the command line, where
other users of the machine would see them). Otherwise the token `labmetal login` saved is
used, for the URL it was issued by (the default URL then).

An https URL is verified against labmetal's own CA (labmetal/tls.py): ``--ca-file`` or
``LABMETAL_CA_FILE``, else the CA in the state directory when this user can read it (on the
lab's server itself), else the system's CAs (a certificate the operator gave).
"""
from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any

import requests

from labmetal.config import default_state_dir
from labmetal.profile import load_profile

DEFAULT_URL = "http://127.0.0.1:6385"
CA_FILE = "LABMETAL_CA_FILE"
PIECE_SIZE = 1024 * 1024


class CliError(Exception):
    """A failure to show the user as it is: usually the server's own message."""


def ca_bundle() -> str | bool:
    """What an https URL is verified with (requests' ``verify``): ``LABMETAL_CA_FILE``
    (``--ca-file`` sets it), else the state directory's labmetal CA if readable, else True
    (the system's CAs)."""
    given = os.environ.get(CA_FILE)
    if given:
        return given
    state_dir = Path(os.environ.get("LABMETAL_STATE_DIR") or default_state_dir())
    ours = state_dir / "tls" / "ca.crt"
    return str(ours) if os.access(ours, os.R_OK) else True


def unreachable(url: str, error: requests.RequestException) -> str:
    """Why ``url`` could not be reached, with what to do when its certificate is the
    cause."""
    reason = getattr(error.args[0] if error.args else None, "reason", error)
    if isinstance(error, requests.exceptions.SSLError):
        return (f"cannot verify the labmetal API at {url}: {reason}. Give labmetal's CA "
                f"with --ca-file or {CA_FILE} (it is at /ca.crt on the service's plain "
                "HTTP address, and in its state directory as tls/ca.crt)")
    return f"cannot reach the labmetal API at {url}: {reason}"


@dataclass
class Client:
    url: str
    auth: tuple[str, str] | None
    token: str | None = None  # an API token, sent as X-Auth-Token
    verify: str | bool = True  # for https: a CA file, or True for the system's CAs

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        if self.token:
            kwargs["headers"] = {**kwargs.get("headers", {}), "X-Auth-Token": self.token}
        try:
            response = requests.request(method, self.url.rstrip("/") + path, auth=self.auth,
                                        timeout=(10, 3600), verify=self.verify, **kwargs)
        except requests.RequestException as error:
            raise CliError(unreachable(self.url, error)) from None
        if not response.ok:
            raise CliError(server_message(response))
        return response.json() if response.content else None

    def download(self, path: str, dest: Path, params: dict[str, str] | None = None,
                 progress: Callable[[int, int | None], None] | None = None) -> Path:
        """GET ``path`` into ``dest``: a file, or a directory where the file takes the
        name the server gives it; streamed in pieces, ``progress(received, total)`` after
        each. Written as ``<file>.part`` and renamed when whole: a failed download leaves
        no file, and an older one as it was. Returns the file."""
        headers = {"X-Auth-Token": self.token} if self.token else {}
        try:
            with requests.get(self.url.rstrip("/") + path, params=params, auth=self.auth,
                              headers=headers, stream=True, timeout=(10, 3600),
                              verify=self.verify) as response:
                if not response.ok:
                    raise CliError(server_message(response))
                if dest.is_dir():
                    dest = dest / attachment_name(response, path)
                total = int(response.headers.get("Content-Length", 0)) or None
                received = 0
                partial = dest.with_name(dest.name + ".part")
                try:
                    with open(partial, "wb") as file:
                        for piece in response.iter_content(PIECE_SIZE):
                            file.write(piece)
                            received += len(piece)
                            if progress:
                                progress(received, total)
                    if total is not None and received != total:
                        raise CliError(f"the download of {path} ended after {received} of "
                                       f"{total} bytes")
                    partial.replace(dest)
                finally:
                    partial.unlink(missing_ok=True)
        except requests.RequestException as error:
            reason = getattr(error.args[0] if error.args else None, "reason", error)
            raise CliError(f"downloading {path} from {self.url}: {reason}") from None
        return dest


def attachment_name(response: requests.Response, path: str) -> str:
    """The file name of the response's Content-Disposition (its last part only: never a
    path elsewhere), else the URL's last segment."""
    header = Message()
    header["Content-Disposition"] = response.headers.get("Content-Disposition", "")
    name = Path(header.get_filename() or "").name
    return name if name not in ("", ".", "..") else path.rstrip("/").rsplit("/", 1)[-1]


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
        return Client(url or DEFAULT_URL, (user, password or ""), verify=ca_bundle())
    profile = load_profile()
    url = url or (profile.url if profile else DEFAULT_URL)
    same = profile is not None and profile.url.rstrip("/") == url.rstrip("/")
    return Client(url, None, profile.token if profile is not None and same else None,
                  verify=ca_bundle())


class CaFileOption(argparse.Action):
    """``--ca-file``: sets ``LABMETAL_CA_FILE`` for this command, so that every request it
    makes (through any Client, or `labmetal login`) verifies the server with it."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        os.environ[CA_FILE] = str(values)
        setattr(namespace, self.dest, values)
