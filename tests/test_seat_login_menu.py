"""The student's menu at the seat login (agent/seat_login.py, api/seat_login.py; issue 16):
its pages and search, its French and English strings, the choices sent to labmetal and the
ones labmetal refuses to parse, and the screen's flow with a scripted keyboard and a fake
labmetal: resume, go back to a save point, start over, begin a TP, pages, search, language.

Fast: no root, no network, no QEMU (the QEMU seat tests type on a real seat's keyboard:
tests/test_seat_login.py, tests/test_diskless.py)."""
from __future__ import annotations

import re
import string
from typing import Any

import pytest

from labmetal.agent import seat_login as seat
from labmetal.api import seat_login as api
from labmetal.api.errors import ApiError

pytestmark = pytest.mark.fast

UUID = "5d2f0c1e-0000-4000-8000-0000000000{:02d}"


class FakeScreen:
    """Answers typed in turn; every line written kept (prompts too)."""

    def __init__(self, typed: list[str]):
        self.typed = list(typed)
        self.lines: list[str] = []

    def say(self, text: str = "") -> None:
        self.lines.append(text)

    def ask(self, prompt: str, secret: bool = False) -> str:
        self.lines.append(prompt)
        if not self.typed:
            raise seat.Idle()
        return self.typed.pop(0)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


class FakeClient:
    """labmetal: the login answer given; a choice in ``refused`` refused with its text."""

    def __init__(self, answer: dict[str, Any], refused: dict[str, str] | None = None):
        self.answer = answer
        self.refused = refused or {}
        self.logins: list[tuple[str, str]] = []
        self.started: list[str] = []

    def login(self, auth: tuple[str, str]) -> dict[str, Any]:
        self.logins.append(auth)
        if auth[1] != "right":
            raise seat.Refused("login_refused")
        return self.answer

    def start(self, auth: tuple[str, str], choice: str, ticket: str) -> dict[str, Any]:
        assert auth == ("sam", "right") and ticket == "T"
        if choice in self.refused:
            raise seat.Refused("said", text=self.refused[choice])
        self.started.append(choice)
        return {"session": choice, "template": "x", "student": "sam"}


def session(number: int, template: str, saves: int = 0) -> dict[str, Any]:
    uuid = UUID.format(number)
    return {"choice": f"s-{uuid}", "label": f"{template} (not saved yet)",
            "template": template, "kind": "resume",
            "saved_at": "2026-12-01T10:00:00+00:00" if saves else None,
            "reset": f"r-{uuid}",
            "saves": [{"choice": f"v-{uuid}-{n}", "number": n, "label": f"step {n}",
                       "created_at": f"2026-12-0{n}T09:30:00+00:00"}
                      for n in range(saves, 0, -1)],
            "saves_left_off": 0}


def new(template: str) -> dict[str, Any]:
    return {"choice": f"t-{template}", "label": f"{template}: new session",
            "template": template, "kind": "new"}


def answer(*choices: dict[str, Any]) -> dict[str, Any]:
    return {"student": "sam", "choices": list(choices), "ticket": "T"}


def many(count: int) -> dict[str, Any]:
    return answer(*[session(n, f"tp-{n:03d}") if n % 2 else new(f"tp-{n:03d}")
                    for n in range(1, count + 1)])


def play(typed: list[str], menu: dict[str, Any], lang: str = "en",
         refused: dict[str, str] | None = None) -> tuple[Any, FakeScreen, FakeClient]:
    screen, client = FakeScreen(typed), FakeClient(menu, refused)
    try:
        started = seat.log_in(seat.Talk(screen, lang), client)  # type: ignore[arg-type]
    except seat.Idle:
        started = "idle"
    return started, screen, client


# -- the pure parts ------------------------------------------------------------------------
def test_the_french_and_english_tables_have_the_same_strings_with_the_same_fields():
    assert set(seat.TEXTS) == set(seat.LANGUAGES) == {"en", "fr"}
    fields = string.Formatter()
    for key, english in seat.TEXTS["en"].items():
        french = seat.TEXTS["fr"][key]
        assert {f for _, f, _, _ in fields.parse(english) if f} == \
            {f for _, f, _, _ in fields.parse(french) if f}, key
    assert set(seat.TEXTS["en"]) == set(seat.TEXTS["fr"])
    assert seat.words("de", "username") == "Username: "  # unknown: English


def test_pages_of_nine_and_a_search_by_template_name():
    found = seat.entries(many(23))
    assert len(found) == 23
    first, page, pages = seat.page_of(found, 0)
    assert (len(first), page, pages) == (9, 0, 3)
    last, page, _ = seat.page_of(found, 7)  # kept within the pages
    assert page == 2 and [e.template for e in last] == [f"tp-{n:03d}" for n in range(19, 24)]
    assert seat.page_of([], 0) == ([], 0, 1)
    assert [e.template for e in seat.matching(found, "TP-01")] == \
        [f"tp-{n:03d}" for n in range(10, 20)]
    assert seat.matching(found, "") == found and seat.matching(found, "nothing") == []


def test_what_labmetal_sends_is_bounded_and_shown_without_control_characters():
    hostile = session(1, "tp\x1b[2J\u202eevil" + "x" * 200, saves=1)
    hostile["saves"][0]["label"] = "\x07bell\r\nline"
    junk = [None, 3, {"choice": "x-nope"}, {"choice": "s-" + "a" * 200}, {"label": "no"}]
    found = seat.entries(answer(hostile, *junk, *[new(f"t{n}") for n in range(2000)]))
    assert len(found) == seat.MAX_ENTRIES - len(junk)  # the first MAX_ENTRIES, junk left out
    shown = found[0]
    assert shown.template.startswith("tp?[2J?evil") and len(shown.template) == 60
    assert shown.saves[0].label == "?bell??line" and shown.when == "2026-12-01 10:00"
    assert seat.shown("a\tb\x00c\u200bd") == "a?b?c?d"
    assert seat.entries({"choices": "not a list"}) == []


def test_what_is_typed_at_the_menu():
    c = seat.command
    assert c("3") == seat.Command("pick", 3) and c(" 12 ") == seat.Command("pick", 12)
    assert c("0") == seat.Command("back") and c("s2") == seat.Command("saves", 2)
    assert c("R 4") == seat.Command("reset", 4) and c("n") == seat.Command("next")
    assert c("P") == seat.Command("previous") and c("l") == seat.Command("language")
    assert c("/Net TP ") == seat.Command("search", text="Net TP")
    assert c("/") == seat.Command("search", text="")
    for nothing in ("", "x", "s", "r-1", "123", "s12345", "yes"):
        assert c(nothing) is None, nothing


def test_the_language_of_the_kernel_command_line():
    assert seat.cmdline_language("quiet labmetal.lang=fr BOOTIF=01-aa") == "fr"
    assert seat.cmdline_language("labmetal.lang=FR_fr") == "fr"
    assert seat.cmdline_language("labmetal.lang=de") is None
    assert seat.cmdline_language("quiet") is None


def test_the_choice_strings_labmetal_accepts():
    uuid = UUID.format(7)
    assert api.parse_choice(f"s-{uuid}") == api.Choice("resume", uuid)
    assert api.parse_choice("t-net-tp") == api.Choice("new", "net-tp")
    assert api.parse_choice(f"v-{uuid}-12") == api.Choice("revert", uuid, 12)
    assert api.parse_choice(f"r-{uuid}") == api.Choice("reset", uuid)
    for text in (f"v-{uuid}", f"v-{uuid}-", f"v-{uuid}-1234567890", "v-net-tp-1",
                 f"r-{uuid}-1", "r-net-tp", f"v-{uuid.upper()}-1", f"x-{uuid}"):
        with pytest.raises(ApiError) as refused:
            api.parse_choice(text)
        assert refused.value.status == 400, text
    for text in (f"s-{uuid}", "t-net-tp", f"v-{uuid}-999999999", f"r-{uuid}"):
        assert re.fullmatch(api.CHOICE, text) and len(text) <= 82  # the body's pattern


# -- the screen ----------------------------------------------------------------------------
def test_a_number_resumes_a_session_or_begins_a_tp_as_the_seat_tests_type_it():
    menu = answer(session(1, "net-tp", saves=2), new("sys-tp"))
    started, screen, client = play(["sam", "wrong", "sam", "right", "1"], menu)
    assert client.started == [f"s-{UUID.format(1)}"] and started["student"] == "sam"
    assert "login refused" in screen.text and "TP sessions of sam:" in screen.text
    assert "  [1] net-tp (saved 2026-12-01 10:00, save points: 2)" in screen.lines
    assert "  [2] sys-tp: new session" in screen.lines and "Your choice (1-2): " in screen.lines
    _, _, client = play(["sam", "right", "2"], menu)
    assert client.started == ["t-sys-tp"]


def test_going_back_to_a_save_point_asks_for_yes_then_starts_it():
    menu = answer(session(1, "net-tp", saves=3))
    typed = ["sam", "right", "s1", "2", "no", "s1", "9", "2", "YES"]
    started, screen, client = play(typed, menu)
    assert client.started == [f"v-{UUID.format(1)}-2"] and started is not None
    assert "Save points of net-tp (newest first):" in screen.lines
    assert "  [1] step 3 (#3, 2026-12-03 09:30)" in screen.lines
    assert screen.text.count('Going back to "step 2" loses what changed in net-tp') == 2
    assert "nothing changed" in screen.lines and "type a number from 0 to 3" in screen.lines


def test_starting_over_from_the_template_needs_yes_and_a_refusal_keeps_the_menu():
    uuid = UUID.format(1)
    menu = answer(session(1, "net-tp"), new("sys-tp"))
    busy = f"Session {uuid} is running on seat a02 and cannot be reset; stop it first"
    typed = ["sam", "right", "r2", "s1", "r1", "yes", "r1", "YES", "2"]
    started, screen, client = play(typed, menu, refused={f"r-{uuid}": busy})
    assert client.started == ["t-sys-tp"] and started is not None
    assert "sys-tp has no session yet: type its number to begin one" in screen.lines
    assert "net-tp has no save point yet" in screen.lines
    assert f"labmetal: {busy}" in screen.lines
    assert screen.text.count("Starting net-tp over loses all its changes") == 2


def test_pages_and_search_on_the_screen():
    typed = ["sam", "right", "n", "n", "n", "p", "n", "3"]
    started, screen, client = play(typed, many(23))
    # n past the last page stays there: 3 of page 3 is tp-021
    assert client.started == ["s-" + UUID.format(21)] and started is not None
    assert "TP sessions of sam:  (page 1/3, 23 TPs)" in screen.lines
    assert "  n: next page   p: previous page" in screen.lines
    typed = ["sam", "right", "/tp-02", "3"]  # tp-020, tp-021, tp-022
    started, screen, client = play(typed, many(23))
    assert client.started == ["t-tp-022"]
    assert 'TP sessions of sam:  (TPs whose name holds "tp-02", page 1/1, 4 TPs)' \
        in screen.lines
    typed = ["sam", "right", "/nothing", "/", "x", "0", "sam", "right", "0"]
    started, screen, client = play(typed, many(23))
    assert started == "idle" and client.started == []  # 0, 0: back to Username
    assert '  (no TP name holds "nothing"; / shows them all)' in screen.lines
    assert "Your choice: " in screen.lines
    assert screen.text.count("(page 1/3, 23 TPs)") == 3  # first, after "/", second login
    assert "not a choice here: a number from 0 to 9, or s1, r1, n, p, /text, l" \
        in screen.lines


def test_more_than_labmetal_sends_is_said():
    menu = {**many(3), "left_off": 297}
    _, screen, _ = play(["sam", "right", "0"], menu)
    assert "  (297 more TPs are not listed here)" in screen.lines


def test_the_language_is_chosen_at_the_first_screen_and_can_change_at_the_menu():
    menu = answer(session(1, "net-tp", saves=1), new("sys-tp"))
    typed = ["1", "sam", "right", "r1", "YES", "r1", "oui"]
    started, screen, client = play(typed, menu)
    assert screen.lines[0].startswith("Language / Langue: [1] Français  [2] English")
    assert "Identifiant : " in screen.lines and "Mot de passe : " in screen.lines
    assert "Sessions de TP de sam :" in screen.lines
    assert "  [1] net-tp (enregistrée le 2026-12-01 10:00, points de sauvegarde : 1)" \
        in screen.lines
    assert "  [2] sys-tp : nouvelle session" in screen.lines
    assert "rien n'a changé" in screen.lines  # YES is not OUI
    assert client.started == [f"r-{UUID.format(1)}"] and started is not None
    typed = ["sam", "right", "l", "0"]
    started, screen, _ = play(typed, menu, lang="fr")
    assert "Votre choix (1-2) : " in screen.lines and "TP sessions of sam:" in screen.lines
    typed = ["1", "2", "sam", "wrong", "sam", "wrong", "sam", "wrong"]
    started, screen, client = play(typed, menu)
    assert started is None and len(client.logins) == 3  # a language is no attempt
    assert screen.lines.count("login refused (wrong user name or password?)") == 3
