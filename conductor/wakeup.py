"""A conductor's small HTTP endpoint: POST /wake (new work for me), GET /status (figures)."""
from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from labmetal.config import split_host_port

LOG = logging.getLogger(__name__)


class WakeServer:
    def __init__(self, listen: str, advertise_host: str, on_wake: Callable[[], None],
                 status: Callable[[], dict[str, Any]]):
        host, port = split_host_port(listen)

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                if self.path != "/wake":
                    self.send_error(404)
                    return
                on_wake()
                self.send_response(204)
                self.end_headers()

            def do_GET(self):  # noqa: N802
                if self.path != "/status":
                    self.send_error(404)
                    return
                body = json.dumps(status()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # quiet: one POST per API request
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        bound_port = self._server.server_address[1]
        shown_host = advertise_host if host in ("0.0.0.0", "::", "") else host
        self.base_url = f"http://{shown_host}:{bound_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="wake-server")

    @property
    def wake_url(self) -> str:
        return self.base_url + "/wake"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
