"""The `labmetal` command: one parser and one dispatch for every command group.

Each group lives in a module of its own (server, lab, users, nodes, rooms, sessions,
images) with ``register(top)``, adding its commands as labmetal/cli/parsing.py says. The
rules every command follows, applied here once:

- Output: what a command returns is shown by labmetal/cli/output.py: with ``--json`` as
  JSON (for programs), else as the command's table or lines for people. Progress and
  warnings go to standard error.
- Exit status: 0 done; 1 refused or failed: the server said no, could not be reached, or
  the operation failed (one line on standard error, ``labmetal <command>: <why>``); 2 a
  usage error: argparse's own (an unknown option, a missing argument) and arguments that
  parse but cannot be used (a wrong value, a state directory without a room). A local
  command that runs a service or a room (`serve`, `lab up`, `demo`) exits with the status
  it returns.
- Global options: ``--url``, ``--ca-file`` and ``--json`` are taken before the group,
  after it or after the command (``labmetal --url U images list`` = ``labmetal images
  --url U list``); credentials come from the environment or `labmetal login`'s profile,
  never from the command line (labmetal/client.py).
"""
from __future__ import annotations

import argparse
import sys

from labmetal.cli import images, lab, nodes, rooms, server, sessions, users
from labmetal.cli.output import show
from labmetal.cli.parsing import Group, UsageError, add_global_options
from labmetal.client import CliError, make_client

GROUPS = (server, lab, users, images, rooms, sessions, nodes)
USAGE, FAILED = 2, 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="labmetal", description=__doc__.split("\n\n")[0],
                                     epilog="Exit status: 0 done, 1 refused or failed, "
                                            "2 usage error.")
    add_global_options(parser, top=True)
    top = Group(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    for group in GROUPS:
        group.register(top)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command_api:
            result = args.command_run(make_client(args.url), args)
        else:
            result = args.command_run(args)
    except (UsageError, ValueError) as error:
        return fail(args, error, USAGE)
    except (CliError, OSError) as error:
        return fail(args, error, FAILED)
    if isinstance(result, int) and not isinstance(result, bool):
        return result  # a local command's own exit status
    show(result, args.json, args.command_human)
    return 0


def fail(args: argparse.Namespace, error: Exception, status: int) -> int:
    """The one line an error gets, without the secrets the command was given."""
    message = str(error)
    for secret in args.command_hide(args) if args.command_hide else ():
        message = message.replace(secret, "******")
    print(f"labmetal {args.command_name}: {message}", file=sys.stderr)
    return status
