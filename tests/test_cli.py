"""The `labmetal` command's one dispatch, without a service: every command line the README
shows parses, the global options work at every level, results are tables for people and JSON
for programs, and the exit status says done (0), refused (1) or misused (2)."""
from __future__ import annotations

import io
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest

import labmetal.cli
from labmetal.cli import build_parser, main
from labmetal.client import CliError

pytestmark = pytest.mark.fast

README = Path(__file__).parent.parent / "README.md"


def readme_command_lines() -> list[list[str]]:
    """The arguments of every `labmetal ...` line in the README's shell blocks (`L=...`
    shorthands expanded, `[optional]` parts and `a|b` alternatives left out)."""
    found = []
    for block in re.findall(r"```sh\n(.*?)```", README.read_text(), re.S):
        block = block.replace("\\\n", " ")
        shorthands = dict(re.findall(r'^\s*(\w+)="([^"]*)"', block, re.M))
        for line in block.splitlines():
            for name, value in shorthands.items():
                line = line.replace(f"${name} ", value + " ")
            for part in re.split(r" ; | && ", re.sub(r"\s#.*$", "", line)):
                words = part.split()
                while words and "=" in words[0]:  # VAR=value before the command
                    words.pop(0)
                if len(words) < 2 or not re.fullmatch(r"(\S*/)?labmetal", words[0]):
                    continue
                rest = re.sub(r"\[[^\]]*\]", "", part.split(words[0], 1)[1])
                if "|" not in rest:
                    found.append(shlex.split(re.sub(r"<(\w+)>", r"\1", rest)))
    return found


@pytest.fixture(autouse=True)
def no_profile(tmp_path: Path, monkeypatch):
    """No stray environment or `labmetal login` profile of the machine's user."""
    for name in ("LABMETAL_URL", "LABMETAL_USER", "LABMETAL_PASSWORD", "LABMETAL_CA_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home" / ".config"))


class FakeApi:
    """A Client that answers from a table, and records what it was asked."""

    def __init__(self, answers: dict[tuple[str, str], Any]):
        self.answers = answers
        self.calls: list[tuple[str, str, Any]] = []

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        self.calls.append((method, path, kwargs.get("json")))
        answer = self.answers[(method, path.split("?")[0])]
        if isinstance(answer, Exception):
            raise answer
        return answer


@pytest.fixture
def api(monkeypatch) -> FakeApi:
    fake = FakeApi({})
    monkeypatch.setattr(labmetal.cli, "make_client", lambda url: fake)
    return fake


def run(capsys, *argv: str, stdin: str = "", monkeypatch=None) -> tuple[int, str, str]:
    if monkeypatch is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_every_command_line_of_the_readme_parses():
    lines = readme_command_lines()
    assert len(lines) > 50 and ["images", "--url", "http://127.0.0.1:6385", "list"] in lines
    parser = build_parser()
    for argv in lines:
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"labmetal {shlex.join(argv)} does not parse")


@pytest.mark.parametrize("argv", [
    ["--url", "U", "--json", "images", "upload", "tp1", "disk.img", "--kind", "whole-disk"],
    ["images", "--url", "U", "--json", "upload", "tp1", "disk.img", "--kind", "whole-disk"],
    ["images", "upload", "tp1", "disk.img", "--kind", "whole-disk", "--url", "U", "--json"],
    ["--url", "U", "images", "--json", "upload", "tp1", "disk.img", "--kind", "whole-disk"],
])
def test_the_global_options_go_before_or_after_the_group(argv):
    args = build_parser().parse_args(argv)
    assert (args.url, args.json, args.command_name) == ("U", True, "images upload")


def test_the_url_comes_from_the_environment_unless_given(monkeypatch):
    monkeypatch.setenv("LABMETAL_URL", "http://env:6385")
    assert build_parser().parse_args(["node", "list"]).url == "http://env:6385"
    assert build_parser().parse_args(["node", "--url", "X", "list"]).url == "X"
    assert build_parser().parse_args(["node", "list"]).json is False


def test_a_list_is_a_table_for_people_and_json_for_programs(api, capsys):
    image = {"name": "tp1", "kind": "whole-disk", "status": "active", "disk_format": "qcow2",
             "size": 1_500_000, "virtual_size": None, "uuid": "u-1"}
    api.answers[("GET", "/v1/images")] = {"images": [image]}
    status, out, err = run(capsys, "images", "list")
    assert status == 0 and err == ""
    assert out.splitlines()[0].split() == ["NAME", "KIND", "STATUS", "FORMAT", "SIZE",
                                           "VIRTUAL", "UUID"]
    assert out.splitlines()[1].split() == ["tp1", "whole-disk", "active", "qcow2", "1.5", "MB",
                                           "u-1"]
    status, out, _ = run(capsys, "images", "list", "--json")
    assert status == 0 and json.loads(out) == [image]

    api.answers[("GET", "/v1/rooms")] = {"rooms": [{"name": "TPR-2", "seat_count": 3,
                                                    "description": None}]}
    _, out, _ = run(capsys, "room", "list")
    assert [line.split() for line in out.splitlines()] == [["ROOM", "SEATS", "DESCRIPTION"],
                                                          ["TPR-2", "3"]]
    _, out, _ = run(capsys, "--json", "room", "list")
    assert json.loads(out)[0]["name"] == "TPR-2"


def test_a_refusal_is_one_line_and_exit_1(api, capsys):
    api.answers[("DELETE", "/v1/images/tp1")] = CliError("Image tp1 is in use.")
    assert run(capsys, "images", "delete", "tp1") == (
        1, "", "labmetal images delete: Image tp1 is in use.\n")
    api.answers[("POST", "/v1/ports")] = CliError("Expected a MAC address")
    status, _, err = run(capsys, "node", "port", "create", "pc1", "zz")
    assert (status, err) == (1, "labmetal node port: Expected a MAC address\n")


def test_a_secret_given_is_never_shown_in_an_error(api, capsys):
    api.answers[("POST", "/v1/nodes")] = CliError("bad ipmi_password 'Sekr3t-pw'")
    status, _, err = run(capsys, "node", "create", "pc1", "--driver", "ipmi",
                         "--driver-info", "ipmi_password=Sekr3t-pw")
    assert (status, err) == (1, "labmetal node create: bad ipmi_password '******'\n")


def test_a_usage_error_is_exit_2(capsys, tmp_path):
    with pytest.raises(SystemExit) as unknown:
        main(["node", "list", "--no-such-option"])
    assert unknown.value.code == 2
    capsys.readouterr()
    status, _, err = run(capsys, "lab", "down", "--state-dir", str(tmp_path))
    assert status == 2 and err.startswith(f"labmetal lab down: no room in {tmp_path}")
    status, _, err = run(capsys, "login", "--user", "ada")
    assert (status, err) == (2, "labmetal login: name the API: --url URL (or LABMETAL_URL)\n")


def test_user_commands_go_through_the_api(api, capsys, monkeypatch):
    api.answers[("GET", "/v1/users")] = {"users": [
        {"name": "ada", "role": "admin", "source": "local", "disabled": False,
         "last_login_at": "2026-12-07T10:00:00+00:00"}]}
    api.answers[("POST", "/v1/users")] = {"name": "tom", "role": "teacher"}
    api.answers[("PATCH", "/v1/users/ada")] = {"name": "ada", "role": "admin"}
    api.answers[("DELETE", "/v1/users/tom")] = None

    status, out, _ = run(capsys, "user", "set", "tom", "--role", "teacher",
                         "--password-stdin", stdin="tom's phrase\n", monkeypatch=monkeypatch)
    assert (status, out) == (0, "user tom (teacher) saved\n")
    assert api.calls[-1] == ("POST", "/v1/users", {"name": "tom", "role": "teacher",
                                                   "source": "local",
                                                   "password": "tom's phrase"})
    run(capsys, "user", "set", "ada", "--password-stdin", stdin="new phrase\n",
        monkeypatch=monkeypatch)
    assert api.calls[-1] == ("PATCH", "/v1/users/ada", {"role": "admin",
                                                        "password": "new phrase"})
    _, out, _ = run(capsys, "user", "list")
    assert [line.split() for line in out.splitlines()] == [
        ["NAME", "ROLE", "SOURCE", "DISABLED", "LAST", "LOGIN"],
        ["ada", "admin", "local", "2026-12-07", "10:00:00"]]
    assert run(capsys, "user", "delete", "tom")[:2] == (
        0, "user tom deleted (and its tokens and sessions)\n")


def test_the_first_admin_is_made_in_the_database_on_the_server(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(labmetal.cli, "make_client", lambda url: None)  # no API used
    state = str(tmp_path / "state")
    status, out, _ = run(capsys, "user", "set", "ada", "--password-stdin", "--state-dir",
                         state, stdin="ada's long phrase\n", monkeypatch=monkeypatch)
    assert (status, out) == (0, "user ada (admin) saved\n")
    status, out, _ = run(capsys, "user", "list", "--json", "--state-dir", state)
    assert [(u["name"], u["role"], u["source"]) for u in json.loads(out)] == [
        ("ada", "admin", "local")]
    status, _, err = run(capsys, "user", "delete", "ghost", "--state-dir", state)
    assert (status, err) == (1, "labmetal user delete: no user ghost\n")
