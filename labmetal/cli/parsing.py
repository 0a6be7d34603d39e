"""How a command group adds its commands to `labmetal`, so that every group does it the same
way and the one dispatch (labmetal/cli/__init__.py) can run any of them.

A group module has ``register(top: Group)``; it adds its group (``top.group("node", ...)``)
and, in it, its commands (``group.command("list", cmd_list, ...)``). A command is a function
and how it is reached:

- an API command (the default) is called as ``run(client, args)`` with the Client for
  ``--url`` and the credentials (labmetal/client.py);
- a local command (``api=False``: it runs on this machine, e.g. `serve`, `lab up`) is called
  as ``run(args)``.

Either returns what to show (labmetal/cli/output.py), None when it printed for people itself,
or, for a local command that runs a service or a room, its exit status as an int.

The global options (``--url``, ``--ca-file``, ``--json``) are accepted at every level of an
API command: ``labmetal --url U images list``, ``labmetal images --url U list`` and ``labmetal
images list --url U`` are the same. Below the top their default is SUPPRESS, so that a level
where an option is not given leaves the value of the level above alone (argparse copies a
sub-parser's defaults over its parent's).
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from labmetal.client import CA_FILE, DEFAULT_URL, CaFileOption, CliError

Human = Callable[[Any], None]


class UsageError(CliError):
    """Arguments that parse but cannot be used (exit status 2, as argparse's own errors)."""


def add_global_options(parser: argparse.ArgumentParser, top: bool = False) -> None:
    """--url, --ca-file and --json; real defaults at the top only (see the module's text)."""
    parser.add_argument("--url", default=os.environ.get("LABMETAL_URL") if top
                        else argparse.SUPPRESS,
                        help=f"the labmetal API (default: $LABMETAL_URL, the URL of "
                             f"`labmetal login`, or {DEFAULT_URL})")
    parser.add_argument("--ca-file", action=CaFileOption,
                        default=None if top else argparse.SUPPRESS,
                        help=f"the CA to verify an https URL with (default: ${CA_FILE}, the "
                             "state directory's labmetal CA when readable, else the system's)")
    add_json_option(parser, top)


def add_json_option(parser: argparse.ArgumentParser, top: bool = False) -> None:
    parser.add_argument("--json", action="store_true",
                        default=False if top else argparse.SUPPRESS,
                        help="print JSON (for programs) instead of a table (for people)")


@dataclass
class Group:
    """The sub-commands of one level: the top (`labmetal X`) or a group (`labmetal node X`)."""
    subparsers: argparse._SubParsersAction
    path: tuple[str, ...] = ()
    api: bool = True  # the default of its commands

    def group(self, name: str, help: str, api: bool = True) -> Group:
        parser = self.subparsers.add_parser(name, help=help)
        if api:
            add_global_options(parser)
        path = (*self.path, name)
        sub = parser.add_subparsers(dest="_".join((*path, "command")), required=True,
                                    metavar="COMMAND")
        return Group(sub, path, api)

    def command(self, name: str, run: Callable[..., Any], help: str,
                parents: tuple[argparse.ArgumentParser, ...] = (), api: bool | None = None,
                human: Human | None = None,
                hide: Callable[[argparse.Namespace], list[str]] | None = None
                ) -> argparse.ArgumentParser:
        """Add one command. ``human``: how its result is shown to people (else as JSON);
        ``hide``: the secrets among its arguments, never shown in an error line."""
        api = self.api if api is None else api
        parser = self.subparsers.add_parser(name, help=help, parents=list(parents))
        if api:
            add_global_options(parser)
        # error lines name the command and its sub-command: `labmetal node port: ...`
        parser.set_defaults(command_run=run, command_api=api, command_human=human,
                            command_hide=hide, command_name=" ".join((*self.path, name)[:2]))
        return parser
