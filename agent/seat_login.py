"""The seat login, in labmetal's ramdisk (mode ``login``): a student at a seat types their
user name and password on the seat's screen; the ramdisk sends them to labmetal over
HTTPS, shows the student's TP sessions, starts the chosen one on this seat and reboots
the seat, whose next boot script sanboots the session's disk (api/seat_login.py).

Why here and not in iPXE's ``login`` prompt: Debian's iPXE has no TLS, and the password
must not cross the seat network in clear (DESIGN §11). The kernel command line gives the
HTTPS URL (``labmetal.tls=``) and the SHA-256 of labmetal's CA certificate
(``labmetal.ca=``): the CA is fetched over plain HTTP like the ramdisk itself, and trusted
only if it matches. Without ``labmetal.ca`` (an operator's own certificate) the ramdisk's
system CAs decide.

The screen is the keyboard's console (``/dev/tty1``) and the kernel's console (a serial
line on a lab PC that has one): prompts go to both, a line is read from whichever gives
one. Nobody typing for ``idle`` seconds, three refused logins, or "0" at the menu reboot
the seat back to its menu.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import select
import ssl
import subprocess
import termios
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

SCREENS = ("/dev/tty1", "/dev/console")
ATTEMPTS = 3
IDLE_SECONDS = 120
_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----\s+([A-Za-z0-9+/=\s]+?)-----END CERTIFICATE-----")
_SHOWN = re.compile(r"[^\x20-\x7e]")


class Idle(Exception):
    """Nobody typed anything for a while."""


class Refused(Exception):
    """labmetal said no: the message is for the student."""


class Unreachable(Exception):
    """labmetal's HTTPS could not be reached, or could not be trusted."""


class Screen:
    """The seat's screens and keyboard: every line written to each, a line read from the
    first that has one (in canonical mode, so the tty's own line editing works)."""

    def __init__(self, paths: Sequence[str], idle: float = IDLE_SECONDS):
        self.idle = idle
        self.fds: list[int] = []
        seen: set[tuple[int, int]] = set()
        for path in paths:
            try:
                fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
            except OSError:
                continue
            ident = (os.fstat(fd).st_dev, os.fstat(fd).st_rdev)
            if ident in seen:  # /dev/console may be tty1 itself
                os.close(fd)
                continue
            seen.add(ident)
            self.fds.append(fd)
        if not self.fds:
            raise RuntimeError(f"no screen to log in on (tried {', '.join(paths)})")

    def say(self, text: str = "") -> None:
        data = (text + "\n").encode()  # the tty's ONLCR makes the line ends
        for fd in self.fds:
            try:
                os.write(fd, data)
            except OSError:
                pass

    def ask(self, prompt: str, secret: bool = False) -> str:
        """One line typed on any screen (without echo if ``secret``)."""
        for fd in self.fds:
            try:
                os.write(fd, prompt.encode())
            except OSError:
                pass
        saved = {fd: self._echo(fd, not secret) for fd in self.fds}
        try:
            deadline = time.monotonic() + self.idle
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Idle()
                ready, _, _ = select.select(self.fds, [], [], left)
                for fd in ready:
                    line = os.read(fd, 4096).decode(errors="replace")
                    if secret:
                        self.say()
                    return line.strip("\r\n")
        finally:
            for fd, attributes in saved.items():
                if attributes is not None:
                    termios.tcsetattr(fd, termios.TCSANOW, attributes)

    @staticmethod
    def _echo(fd: int, on: bool) -> list[Any] | None:
        """Canonical input with echo on or off; the previous settings (None: not a tty)."""
        try:
            before = termios.tcgetattr(fd)
        except termios.error:
            return None
        after = list(before)
        after[3] = (after[3] | termios.ICANON | termios.ECHO) if on else \
            ((after[3] | termios.ICANON) & ~termios.ECHO)
        termios.tcsetattr(fd, termios.TCSANOW, after)
        return before


def pinned_ca(api_url: str, pin: str, into: Path) -> Path:
    """labmetal's CA certificate, fetched from ``api_url`` over plain HTTP and kept (in
    ``into``) only if its SHA-256 is ``pin``: whoever could change it on the way could
    change the kernel command line too, but not without being the one who served it."""
    try:
        answer = requests.get(f"{api_url.rstrip('/')}/ca.crt", timeout=30)
        answer.raise_for_status()
    except requests.RequestException as error:
        raise Unreachable(f"labmetal's CA certificate could not be fetched: {error}") from None
    match = _PEM.search(answer.content)
    if match is None:
        raise Unreachable("labmetal's CA certificate is not a PEM certificate")
    der = base64.b64decode(b"".join(match.group(1).split()))
    if hashlib.sha256(der).hexdigest() != pin.lower():
        raise Unreachable("labmetal's CA certificate is not the one this ramdisk was told "
                          "to trust: not sending any password")
    into.mkdir(parents=True, exist_ok=True)
    path = into / "labmetal-ca.pem"
    path.write_text(ssl.DER_cert_to_PEM_cert(der))
    return path


def _fault(response: requests.Response) -> str:
    """The API's message (Ironic's double-encoded error), shown as plain text."""
    try:
        text = json.loads(response.json()["error_message"])["faultstring"]
    except (ValueError, KeyError, TypeError):
        text = f"HTTP {response.status_code}"
    return _SHOWN.sub("?", str(text))[:200]


@dataclass
class LoginClient:
    """``/v1/seat-login/<mac>`` over HTTPS, trusting ``verify`` (a CA file, or True for
    the system's)."""
    tls_url: str
    mac: str
    verify: str | bool

    def _post(self, path: str, auth: tuple[str, str], body: dict[str, Any]) -> dict[str, Any]:
        url = f"{self.tls_url.rstrip('/')}/v1/seat-login/{self.mac.replace(':', '-')}{path}"
        try:
            answer = requests.post(url, json=body, auth=auth, verify=self.verify, timeout=60,
                                   headers={"X-OpenStack-Ironic-API-Version": "latest"})
        except requests.RequestException as error:
            raise Unreachable(f"labmetal could not be reached over HTTPS: "
                              f"{type(error).__name__}") from None
        if answer.status_code == 401:
            raise Refused("login refused (wrong user name or password?)")
        if answer.status_code != 200:
            raise Refused(_fault(answer))
        try:
            return answer.json()
        except ValueError:
            raise Refused("labmetal's answer was not understood") from None

    def login(self, auth: tuple[str, str]) -> dict[str, Any]:
        return self._post("", auth, {})

    def start(self, auth: tuple[str, str], choice: str, ticket: str) -> dict[str, Any]:
        return self._post("/start", auth, {"choice": choice, "ticket": ticket})


def _shown(text: Any) -> str:
    return _SHOWN.sub("?", str(text))[:120]


def session_menu(screen: Screen, client: LoginClient, auth: tuple[str, str],
                 answer: dict[str, Any]) -> dict[str, Any] | None:
    """The student's choice, started on this seat; None: back to the login."""
    choices = answer.get("choices") or []
    screen.say(f"\nTP sessions of {_shown(answer.get('student'))}:")
    for number, choice in enumerate(choices, start=1):
        screen.say(f"  [{number}] {_shown(choice.get('label'))}")
    screen.say("  [0] back")
    while True:
        typed = screen.ask(f"Your choice (1-{len(choices)}): ").strip()
        if typed == "0":
            return None
        if typed.isdigit() and 1 <= int(typed) <= len(choices):
            choice = choices[int(typed) - 1]
            return client.start(auth, str(choice.get("choice")), str(answer.get("ticket")))
        screen.say(f"type a number from 0 to {len(choices)}")


def log_in(screen: Screen, client: LoginClient) -> dict[str, Any] | None:
    """Ask, check, choose: the session started on this seat, or None (give up)."""
    for _ in range(ATTEMPTS):
        user = screen.ask("Username: ").strip()
        if not user:
            continue
        password = screen.ask("Password: ", secret=True)
        auth = (user, password)
        try:
            answer = client.login(auth)
            if "started" in answer:
                return answer["started"]
            started = session_menu(screen, client, auth, answer)
        except Refused as refusal:
            screen.say(f"labmetal: {refusal}")
            continue
        if started is not None:
            return started
    return None


def run(api_url: str, tls_url: str | None, pin: str | None, mac: str | None,
        reboot: Sequence[str], screens: Sequence[str] = SCREENS,
        idle: float = IDLE_SECONDS, run_dir: Path = Path("/run/labmetal")) -> int:
    """The login, then the seat reboots (into the started session, or back to its menu)."""
    screen = Screen(screens, idle)
    screen.say("\nlabmetal - log in to your TP session")
    try:
        if not tls_url or not mac:
            raise Unreachable("this ramdisk was not told labmetal's HTTPS URL (labmetal.tls) "
                              "or the seat's MAC (BOOTIF)")
        verify: str | bool = str(pinned_ca(api_url, pin, run_dir)) if pin else True
        started = log_in(screen, LoginClient(tls_url, mac, verify))
    except Idle:
        screen.say("\nlabmetal: nobody typed anything; back to the seat's menu")
        started = None
    except Unreachable as error:
        screen.say(f"labmetal: {error}; back to the seat's menu in 10 s")
        time.sleep(10)
        started = None
    if started is not None:
        screen.say(f"labmetal: starting {_shown(started.get('student'))}'s session of "
                   f"{_shown(started.get('template'))}; this seat restarts into it")
    time.sleep(2)  # time to read it
    subprocess.run(list(reboot), check=False)
    return 0 if started is not None else 1
