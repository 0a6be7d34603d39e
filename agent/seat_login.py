"""The seat login, in labmetal's ramdisk (mode ``login``): a student at a seat types their
user name and password on the seat's screen; the ramdisk sends them to labmetal over
HTTPS, shows the student's menu, does the chosen thing on this seat and reboots the seat,
whose next boot script sanboots the session's disk (api/seat_login.py).

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

The menu (issue 16), one TP a line, 9 a page, what a student expects of a text screen:

- a number resumes that TP's session, or begins one of a TP they have none of (the
  flow the seat tests type: a number, Enter);
- ``s<number>`` lists that session's save points (the newest first, as labmetal sends
  them); picking one goes back to it, then resumes: what changed since is lost, so it asks
  to type YES (OUI in French) like starting over does, though the issue asks it only there;
- ``r<number>`` starts the TP over from its template (its changes and save points go),
  after typing YES;
- ``n``/``p`` the next and previous page, ``/text`` shows only the TPs whose name holds
  ``text`` (any case), ``/`` all of them again; ``l`` switches French/English; ``0`` back.

A refused choice (a session busy on another seat, an old ticket) is shown and the menu
stays, so the student can pick another. The language is English, or French where the
kernel command line says ``labmetal.lang=fr``; the first screen offers both (``1``/``2``
typed as the user name switch it: a user named ``1`` or ``2`` cannot log in at a seat),
and every string the seat writes itself is in ``TEXTS``, in both. labmetal's own
messages come as they are (in English). Whatever labmetal sends is shown without control
characters and cut to the screen's width, and an answer over ``MAX_ANSWER`` bytes is
refused: the seat trusts labmetal's certificate, not the size of what a student made.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

SCREENS = ("/dev/tty1", "/dev/console")
ATTEMPTS = 3
IDLE_SECONDS = 120
PAGE = 9  # one key each on the seat's screen
MAX_ANSWER = 2 * 2**20  # bytes of one labmetal answer
MAX_ENTRIES = 1000
MAX_SAVES = 50
WIDTH = 76  # characters of a line of labmetal's text on an 80-column screen
_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----\s+([A-Za-z0-9+/=\s]+?)-----END CERTIFICATE-----")

LANGUAGES = ("en", "fr")
# Every string the seat writes itself, in each language (the same keys: tests check it).
TEXTS: dict[str, dict[str, str]] = {
    "en": {
        "banner": "labmetal - log in to your TP session",
        "languages": "Language / Langue: [1] Français  [2] English  (type 1 or 2 at "
                     "the prompt below)",
        "username": "Username: ",
        "password": "Password: ",
        "login_refused": "login refused (wrong user name or password?)",
        "said": "labmetal: {text}",
        "not_understood": "labmetal's answer was not understood",
        "too_large": "labmetal's answer is too large",
        "unreachable": "labmetal could not be reached over HTTPS: {error}",
        "ca_fetch": "labmetal's CA certificate could not be fetched: {error}",
        "ca_not_pem": "labmetal's CA certificate is not a PEM certificate",
        "ca_other": "labmetal's CA certificate is not the one this ramdisk was told to "
                    "trust: not sending any password",
        "no_tls": "this ramdisk was not told labmetal's HTTPS URL (labmetal.tls) or the "
                  "seat's MAC (BOOTIF)",
        "unreachable_back": "labmetal: {error}; back to the seat's menu in 10 s",
        "idle": "labmetal: nobody typed anything; back to the seat's menu",
        "starting": "labmetal: starting {student}'s session of {template}; this seat "
                    "restarts into it",
        "sessions_of": "TP sessions of {student}:",
        "page": "page {page}/{pages}, {count} TPs",
        "search_now": "TPs whose name holds \"{text}\"",
        "no_match": "  (no TP name holds \"{text}\"; / shows them all)",
        "resume_line": "{template} ({when})",
        "resume_line_saves": "{template} ({when}, save points: {saves})",
        "saved": "saved {when}",
        "not_saved": "not saved yet",
        "new_line": "{template}: new session",
        "back": "  [0] back",
        "left_off": "  ({count} more TPs are not listed here)",
        "help_pick": "  1-{last}: resume or begin that TP",
        "help_actions": "  s1: its save points   r1: start it over from its template",
        "help_pages": "  n: next page   p: previous page",
        "help_search": "  /text: TPs whose name holds text   l: Français",
        "choose": "Your choice (1-{last}): ",
        "choose_none": "Your choice: ",
        "not_a_choice": "not a choice here: a number from 0 to {last}, or s1, r1, n, p, "
                        "/text, l",
        "no_saves": "{template} has no save point yet",
        "no_session": "{template} has no session yet: type its number to begin one",
        "no_reset": "you may not go back to a save point or to the template",
        "saves_of": "Save points of {template} (newest first):",
        "save_line": "{label} (#{number}, {when})",
        "saves_left_off": "  ({count} older save points are not listed here)",
        "choose_save": "Save point (1-{last}, 0: back): ",
        "not_a_save": "type a number from 0 to {last}",
        "confirm_revert": "Going back to \"{label}\" loses what changed in {template} since.",
        "confirm_reset": "Starting {template} over loses all its changes and save points.",
        "confirm": "Type YES to go on, anything else to keep it: ",
        "yes": "YES",
        "kept": "nothing changed",
    },
    "fr": {
        "banner": "labmetal - connexion à votre session de TP",
        "languages": "Language / Langue: [1] Français  [2] English  (tapez 1 ou 2 "
                     "ci-dessous)",
        "username": "Identifiant : ",
        "password": "Mot de passe : ",
        "login_refused": "connexion refusée (identifiant ou mot de passe erroné ?)",
        "said": "labmetal : {text}",
        "not_understood": "la réponse de labmetal n'a pas été comprise",
        "too_large": "la réponse de labmetal est trop grande",
        "unreachable": "labmetal injoignable en HTTPS : {error}",
        "ca_fetch": "le certificat de l'autorité de labmetal n'a pas pu être "
                    "récupéré : {error}",
        "ca_not_pem": "le certificat de l'autorité de labmetal n'est pas un "
                      "certificat PEM",
        "ca_other": "le certificat de l'autorité de labmetal n'est pas celui que ce "
                    "ramdisk doit croire : aucun mot de passe n'est envoyé",
        "no_tls": "ce ramdisk ne connaît pas l'URL HTTPS de labmetal (labmetal.tls) "
                  "ou l'adresse MAC du poste (BOOTIF)",
        "unreachable_back": "labmetal : {error} ; retour au menu du poste dans 10 s",
        "idle": "labmetal : personne n'a rien tapé ; retour au menu du poste",
        "starting": "labmetal : démarrage de la session de {template} de {student} ; "
                    "ce poste redémarre dessus",
        "sessions_of": "Sessions de TP de {student} :",
        "page": "page {page}/{pages}, {count} TP",
        "search_now": "TP dont le nom contient \"{text}\"",
        "no_match": "  (aucun nom de TP ne contient \"{text}\" ; / les montre tous)",
        "resume_line": "{template} ({when})",
        "resume_line_saves": "{template} ({when}, points de sauvegarde : {saves})",
        "saved": "enregistrée le {when}",
        "not_saved": "pas encore enregistrée",
        "new_line": "{template} : nouvelle session",
        "back": "  [0] retour",
        "left_off": "  ({count} autres TP ne sont pas listés ici)",
        "help_pick": "  1-{last} : reprendre ou commencer ce TP",
        "help_actions": "  s1 : ses points de sauvegarde   r1 : le recommencer depuis son "
                        "modèle",
        "help_pages": "  n : page suivante   p : page précédente",
        "help_search": "  /texte : TP dont le nom contient texte   l : English",
        "choose": "Votre choix (1-{last}) : ",
        "choose_none": "Votre choix : ",
        "not_a_choice": "ce n'est pas un choix : un nombre de 0 à {last}, ou s1, r1, "
                        "n, p, /texte, l",
        "no_saves": "{template} n'a pas encore de point de sauvegarde",
        "no_session": "{template} n'a pas encore de session : tapez son numéro pour "
                      "en commencer une",
        "no_reset": "vous ne pouvez pas revenir à un point de sauvegarde ni au "
                    "modèle",
        "saves_of": "Points de sauvegarde de {template} (le plus récent d'abord) :",
        "save_line": "{label} (n°{number}, {when})",
        "saves_left_off": "  ({count} points de sauvegarde plus anciens ne sont pas "
                          "listés ici)",
        "choose_save": "Point de sauvegarde (1-{last}, 0 : retour) : ",
        "not_a_save": "tapez un nombre de 0 à {last}",
        "confirm_revert": "Revenir à \"{label}\" perd ce qui a changé dans "
                          "{template} depuis.",
        "confirm_reset": "Recommencer {template} perd toutes ses modifications et ses "
                         "points de sauvegarde.",
        "confirm": "Tapez OUI pour continuer, autre chose pour le garder : ",
        "yes": "OUI",
        "kept": "rien n'a changé",
    },
}


def words(lang: str, key: str, **params: Any) -> str:
    """The seat's string ``key`` in ``lang`` (English if not known), with ``params``."""
    return TEXTS.get(lang, TEXTS["en"])[key].format(**params)


def shown(text: Any, width: int = WIDTH) -> str:
    """labmetal's text as the screen may show it: no control characters (nor any other
    unprintable one: escapes, bidi overrides), one line, at most ``width`` characters."""
    return "".join(c if c.isprintable() else "?" for c in str(text)[:width])


def cmdline_language(cmdline: str) -> str | None:
    """``labmetal.lang=`` of a kernel command line, if it is one the seat speaks."""
    for word in cmdline.split():
        if word.startswith("labmetal.lang="):
            lang = word.split("=", 1)[1].lower()[:2]
            return lang if lang in LANGUAGES else None
    return None


class Said(Exception):
    """A message for the student: a key of ``TEXTS`` with its parameters."""

    def __init__(self, key: str, **params: Any):
        super().__init__(key, params)
        self.key, self.params = key, params

    def text(self, lang: str) -> str:
        return words(lang, self.key, **self.params)


class Idle(Exception):
    """Nobody typed anything for a while."""


class Refused(Said):
    """labmetal said no: the message is for the student."""


class Unreachable(Said):
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
        raise Unreachable("ca_fetch", error=shown(error, 160)) from None
    match = _PEM.search(answer.content)
    if match is None:
        raise Unreachable("ca_not_pem")
    der = base64.b64decode(b"".join(match.group(1).split()))
    if hashlib.sha256(der).hexdigest() != pin.lower():
        raise Unreachable("ca_other")
    into.mkdir(parents=True, exist_ok=True)
    path = into / "labmetal-ca.pem"
    path.write_text(ssl.DER_cert_to_PEM_cert(der))
    return path


def _fault(status: int, content: bytes) -> str:
    """The API's message (Ironic's double-encoded error), shown as plain text."""
    try:
        text = json.loads(json.loads(content)["error_message"])["faultstring"]
    except (ValueError, KeyError, TypeError):
        text = f"HTTP {status}"
    return shown(text, 200)


def _bounded(answer: requests.Response) -> bytes:
    """The answer's body, or its first ``MAX_ANSWER`` bytes and one more."""
    chunks, size = [], 0
    for chunk in answer.iter_content(65536):
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_ANSWER:
            break
    return b"".join(chunks)


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
            with requests.post(url, json=body, auth=auth, verify=self.verify, timeout=60,
                               stream=True,
                               headers={"X-OpenStack-Ironic-API-Version": "latest"}) as answer:
                status, content = answer.status_code, _bounded(answer)
        except requests.RequestException as error:
            raise Unreachable("unreachable", error=type(error).__name__) from None
        if len(content) > MAX_ANSWER:
            raise Refused("too_large")
        if status == 401:
            raise Refused("login_refused")
        if status != 200:
            raise Refused("said", text=_fault(status, content))
        try:
            found = json.loads(content)
        except ValueError:
            raise Refused("not_understood") from None
        if not isinstance(found, dict):
            raise Refused("not_understood")
        return found

    def login(self, auth: tuple[str, str]) -> dict[str, Any]:
        return self._post("", auth, {})

    def start(self, auth: tuple[str, str], choice: str, ticket: str) -> dict[str, Any]:
        return self._post("/start", auth, {"choice": choice, "ticket": ticket})


# -- the menu, as data ----------------------------------------------------------------------
@dataclass(frozen=True)
class SavePoint:
    choice: str  # v-<session>-<number>
    number: int
    label: str
    when: str


@dataclass(frozen=True)
class Entry:
    """One TP of the menu: its session (``kind`` resume) or none yet (``kind`` new)."""
    choice: str  # s-<session> or t-<template>
    template: str
    kind: str
    when: str | None = None  # last saved, "YYYY-MM-DD HH:MM"
    saves: tuple[SavePoint, ...] = ()
    saves_left_off: int = 0
    reset: str | None = None  # r-<session>, where the student may start it over


_CHOICE = re.compile(r"[stvr]-[A-Za-z0-9-]{1,80}")


def _when(value: Any) -> str | None:
    """An ISO time as the menu shows it (labmetal's UTC, to the minute)."""
    return shown(value, 16).replace("T", " ") if isinstance(value, str) and value else None


def _count(value: Any) -> int:
    return value if isinstance(value, int) and value > 0 else 0


def _choice(value: Any) -> str | None:
    return value if isinstance(value, str) and _CHOICE.fullmatch(value) else None


def entries(answer: dict[str, Any]) -> list[Entry]:
    """The menu's TPs from labmetal's login answer (at most ``MAX_ENTRIES``, each at most
    ``MAX_SAVES`` save points); what is not a well-formed choice is left out."""
    found: list[Entry] = []
    listed = answer.get("choices")
    for item in listed[:MAX_ENTRIES] if isinstance(listed, list) else []:
        if not isinstance(item, dict) or _choice(item.get("choice")) is None:
            continue
        choice = item["choice"]
        template = shown(item.get("template") or item.get("label") or choice[2:], 60)
        if not choice.startswith("s-"):
            found.append(Entry(choice, template, "new"))
            continue
        saves = []
        listed_saves = item.get("saves")
        for save in listed_saves[:MAX_SAVES] if isinstance(listed_saves, list) else []:
            if isinstance(save, dict) and _choice(save.get("choice")) and \
                    isinstance(save.get("number"), int):
                saves.append(SavePoint(save["choice"], save["number"],
                                       shown(save.get("label") or "", 48),
                                       _when(save.get("created_at")) or "?"))
        found.append(Entry(choice, template, "resume", _when(item.get("saved_at")),
                           tuple(saves), _count(item.get("saves_left_off")),
                           _choice(item.get("reset"))))
    return found


def matching(found: Sequence[Entry], text: str) -> list[Entry]:
    """The TPs whose template name holds ``text`` (any case); all for no text."""
    wanted = text.strip().lower()
    return [entry for entry in found if wanted in entry.template.lower()]


def page_of(found: Sequence[Entry], page: int) -> tuple[list[Entry], int, int]:
    """The entries of page ``page`` (from 0, kept within the pages), that page and the
    number of pages (at least 1)."""
    pages = max(1, -(-len(found) // PAGE))
    page = min(max(page, 0), pages - 1)
    return list(found[page * PAGE:(page + 1) * PAGE]), page, pages


def entry_line(lang: str, entry: Entry) -> str:
    if entry.kind == "new":
        return words(lang, "new_line", template=entry.template)
    when = words(lang, "saved", when=entry.when) if entry.when else words(lang, "not_saved")
    if entry.saves:
        return words(lang, "resume_line_saves", template=entry.template, when=when,
                     saves=len(entry.saves) + entry.saves_left_off)
    return words(lang, "resume_line", template=entry.template, when=when)


@dataclass(frozen=True)
class Command:
    """What was typed at the menu: ``what`` is pick, saves, reset (``number`` on the page),
    next, previous, search (``text``), language, back; None: not a command."""
    what: str
    number: int = 0
    text: str = ""


def command(typed: str) -> Command | None:
    typed = typed.strip()
    if typed.startswith("/"):
        return Command("search", text=typed[1:].strip()[:60])
    typed = typed.lower()
    if typed == "0":
        return Command("back")
    if typed.isdigit() and len(typed) <= 2:
        return Command("pick", int(typed))
    if len(typed) >= 2 and typed[0] in "sr" and typed[1:].strip().isdigit() and \
            len(typed) <= 4:
        return Command("saves" if typed[0] == "s" else "reset", int(typed[1:]))
    return {"n": Command("next"), "p": Command("previous"), "l": Command("language"),
            "+": Command("next"), "-": Command("previous")}.get(typed)


# -- the screen flow ------------------------------------------------------------------------
@dataclass
class Talk:
    """The screen, in the student's language (which they may change)."""
    screen: Any  # Screen, or a test's
    lang: str = "en"

    def say(self, key: str, **params: Any) -> None:
        self.screen.say(words(self.lang, key, **params))

    def ask(self, key: str, secret: bool = False, **params: Any) -> str:
        return self.screen.ask(words(self.lang, key, **params), secret=secret)

    def switch(self) -> None:
        self.lang = "fr" if self.lang == "en" else "en"


@dataclass
class Menu:
    """The student's menu: the TPs, the search and the page shown."""
    talk: Talk
    client: LoginClient
    auth: tuple[str, str]
    student: str
    ticket: str
    found: list[Entry]
    left_off: int = 0
    search: str = ""
    page: int = 0

    def show(self) -> list[Entry]:
        """Write the page; its entries."""
        say, lang = self.talk.say, self.talk.lang
        listed = matching(self.found, self.search)
        shown_now, self.page, pages = page_of(listed, self.page)
        about = [words(lang, "page", page=self.page + 1, pages=pages, count=len(listed))] \
            if pages > 1 or self.search else []
        if self.search:
            about.insert(0, words(lang, "search_now", text=self.search))
        self.talk.screen.say("")
        self.talk.screen.say(words(lang, "sessions_of", student=self.student) +
                             (f"  ({', '.join(about)})" if about else ""))
        for number, entry in enumerate(shown_now, start=1):
            self.talk.screen.say(f"  [{number}] {entry_line(lang, entry)}")
        if not shown_now:
            say("no_match", text=self.search)
        say("back")
        if self.left_off and not self.search:
            say("left_off", count=self.left_off)
        if shown_now:
            say("help_pick", last=len(shown_now))
        if any(entry.kind == "resume" and entry.reset for entry in shown_now):
            say("help_actions")
        if pages > 1:
            say("help_pages")
        say("help_search")
        return shown_now

    def run(self) -> dict[str, Any] | None:
        """The student's choice, started on this seat; None: back to the login."""
        shown_now = self.show()
        while True:
            if shown_now:
                typed = self.talk.ask("choose", last=len(shown_now))
            else:
                typed = self.talk.ask("choose_none")
            order = command(typed)
            entry = shown_now[order.number - 1] \
                if order is not None and 1 <= order.number <= len(shown_now) else None
            try:
                started, again = self._do(order, entry, len(shown_now))
            except Refused as refusal:  # shown; the student picks something else
                self.talk.screen.say(refusal.text(self.talk.lang))
                started, again = None, False
            if started is not None or (order is not None and order.what == "back"):
                return started
            if again:
                shown_now = self.show()

    def _do(self, order: Command | None, entry: Entry | None,
            last: int) -> tuple[dict[str, Any] | None, bool]:
        """Do what was typed: what started, and whether to show the menu again."""
        if order is None or (order.what in ("pick", "saves", "reset") and entry is None):
            self.talk.say("not_a_choice", last=last)
            return None, False
        if order.what == "back":
            return None, False
        if order.what in ("next", "previous"):
            self.page += 1 if order.what == "next" else -1
            return None, True
        if order.what == "search":
            self.search, self.page = order.text, 0
            return None, True
        if order.what == "language":
            self.talk.switch()
            return None, True
        assert entry is not None
        if order.what == "pick":
            return self._start(entry.choice), False
        if entry.kind != "resume":
            self.talk.say("no_session", template=entry.template)
            return None, False
        if entry.reset is None:
            self.talk.say("no_reset")
            return None, False
        if order.what == "reset":
            self.talk.say("confirm_reset", template=entry.template)
            return (self._start(entry.reset) if self._confirmed() else None), False
        return self._save_point(entry), True

    def _save_point(self, entry: Entry) -> dict[str, Any] | None:
        """The save points of the entry's session; the one picked, confirmed, started."""
        if not entry.saves:
            self.talk.say("no_saves", template=entry.template)
            return None
        self.talk.screen.say("")
        self.talk.say("saves_of", template=entry.template)
        for number, save in enumerate(entry.saves, start=1):
            self.talk.screen.say(f"  [{number}] " + words(
                self.talk.lang, "save_line", label=save.label, number=save.number,
                when=save.when))
        self.talk.say("back")
        if entry.saves_left_off:
            self.talk.say("saves_left_off", count=entry.saves_left_off)
        last = len(entry.saves)
        while True:
            typed = self.talk.ask("choose_save", last=last).strip()
            if typed == "0":
                return None
            if typed.isdigit() and 1 <= int(typed) <= last:
                break
            self.talk.say("not_a_save", last=last)
        save = entry.saves[int(typed) - 1]
        self.talk.say("confirm_revert", label=save.label, template=entry.template)
        return self._start(save.choice) if self._confirmed() else None

    def _confirmed(self) -> bool:
        typed = self.talk.ask("confirm").strip()
        if typed.upper() == words(self.talk.lang, "yes"):
            return True
        self.talk.say("kept")
        return False

    def _start(self, choice: str) -> dict[str, Any]:
        return self.client.start(self.auth, choice, self.ticket)


def session_menu(talk: Talk, client: LoginClient, auth: tuple[str, str],
                 answer: dict[str, Any]) -> dict[str, Any] | None:
    """The student's choice, started on this seat; None: back to the login."""
    menu = Menu(talk, client, auth, shown(answer.get("student"), 64),
                str(answer.get("ticket"))[:100], entries(answer),
                _count(answer.get("left_off")))
    return menu.run()


def log_in(talk: Talk, client: LoginClient) -> dict[str, Any] | None:
    """Ask, check, choose: the session started on this seat, or None (give up). ``1`` or
    ``2`` typed as the user name switch to French or English."""
    talk.say("languages")
    tries = 0
    while tries < ATTEMPTS:
        user = talk.ask("username").strip()
        if user in ("1", "2"):
            talk.lang = "fr" if user == "1" else "en"
            talk.say("banner")
            continue
        if not user:
            continue
        tries += 1
        password = talk.ask("password", secret=True)
        auth = (user, password)
        try:
            answer = client.login(auth)
            started = answer["started"] if isinstance(answer.get("started"), dict) \
                else session_menu(talk, client, auth, answer)
        except Refused as refusal:
            talk.screen.say(refusal.text(talk.lang))
            continue
        if started is not None:
            return started
    return None


def run(api_url: str, tls_url: str | None, pin: str | None, mac: str | None,
        reboot: Sequence[str], screens: Sequence[str] = SCREENS,
        idle: float = IDLE_SECONDS, run_dir: Path = Path("/run/labmetal"),
        lang: str | None = None, local: Callable[[], int] | None = None) -> int:
    """The login, then the seat reboots (into the started session, or back to its menu).
    ``lang``: the screen's first language (default: the kernel command line's
    ``labmetal.lang``, else English). ``local``: puts a local session on this seat's
    disk and reboots into it (agent/session_sync.py), here, without booting labmetal's
    ramdisk a second time for it."""
    if lang is None:
        try:
            lang = cmdline_language(Path("/proc/cmdline").read_text())
        except OSError:
            lang = None
    talk = Talk(Screen(screens, idle), lang or "en")
    talk.screen.say("")
    talk.say("banner")
    try:
        if not tls_url or not mac:
            raise Unreachable("no_tls")
        verify: str | bool = str(pinned_ca(api_url, pin, run_dir)) if pin else True
        started = log_in(talk, LoginClient(tls_url, mac, verify))
    except Idle:
        talk.screen.say("")
        talk.say("idle")
        started = None
    except Unreachable as error:
        talk.say("unreachable_back", error=error.text(talk.lang))
        time.sleep(10)
        started = None
    if started is not None:
        talk.say("starting", student=shown(started.get("student"), 64),
                 template=shown(started.get("template"), 60))
    time.sleep(2)  # time to read it
    if started is not None and started.get("mode") == "local" and local is not None:
        return local()
    subprocess.run(list(reboot), check=False)
    return 0 if started is not None else 1
