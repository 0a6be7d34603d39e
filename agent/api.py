"""The seat's HTTP command API, which the conductor calls at the agent's callback URL.

Every request must carry ``Authorization: Bearer <agent token>``; anything else gets 401
before the request is even parsed, and nothing happens. A new command starts only after
its 202 has been sent, so the conductor always learns of a command before its effects.
"""
from __future__ import annotations

import json
import logging
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from labmetal.agent.commands import Commands, Refused
from labmetal.agent.identity import Identity
from labmetal.agent.inventory import Inventory

LOG = logging.getLogger(__name__)

MAX_BODY = 1024 * 1024


class CommandServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], commands: Commands, identity: Identity,
                 inventory: Inventory) -> None:
        super().__init__(address, _Handler)
        self.commands = commands
        self.identity = identity
        self.inventory = inventory


class _Handler(BaseHTTPRequestHandler):
    server: CommandServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if not self._authorized():
            return
        if self.path == "/v1/status":
            self._reply(200, {"node_uuid": self.server.identity.node_uuid,
                              "inventory": self.server.inventory.to_dict(),
                              "commands": [c.view() for c in self.server.commands.all()]})
        elif self.path.startswith("/v1/commands/"):
            command = self.server.commands.get(self.path.removeprefix("/v1/commands/"))
            if command is None:
                self._reply(404, {"error": "no such command"})
            else:
                self._reply(200, command.view())
        else:
            self._reply(404, {"error": f"no such resource {self.path}"})

    def do_POST(self) -> None:
        if not self._authorized():
            return
        if self.path != "/v1/commands":
            self._reply(404, {"error": f"no such resource {self.path}"})
            return
        body = self._json_body()
        if body is None:
            return
        name, params, request_id = body.get("name"), body.get("params", {}), body.get("request_id")
        if not (isinstance(name, str) and isinstance(params, dict)
                and isinstance(request_id, str) and request_id):
            self._reply(400, {"error": 'expected {"name": str, "params": {...}, '
                                       '"request_id": str}'})
            return
        try:
            command, created = self.server.commands.submit(name, params, request_id)
        except Refused as refused:
            self._reply(refused.status, {"error": str(refused)})
            return
        try:
            self._reply(202, command.view())
        finally:
            if created:
                self.server.commands.start(command)

    def _authorized(self) -> bool:
        scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() == "bearer" and self.server.identity.accepts(token.strip()):
            return True
        LOG.warning("refused %s %s from %s: missing or wrong agent token", self.command,
                    self.path, self.client_address[0])
        self.close_connection = True  # the body, if any, is left unread
        self._reply(401, {"error": "a valid agent token is required"},
                    {"WWW-Authenticate": "Bearer"})
        return False

    def _json_body(self) -> dict[str, Any] | None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self.close_connection = True
            self._reply(413, {"error": "request body too large"})
            return None
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            body = None
        if not isinstance(body, dict):
            self._reply(400, {"error": "the body must be a JSON object"})
            return None
        return body

    def _reply(self, status: int, body: dict[str, Any],
               headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def log_message(self, format: str, *args: Any) -> None:
        LOG.debug("%s %s", self.client_address[0], format % args)
