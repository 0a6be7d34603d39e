"""`labmetal user ...`, `labmetal login` and `labmetal logout`: accounts.

The `user` commands go through the API (/v1/users, for admins) like every other command.
One case stays local: on the server itself, with the service's storage named (``--local``
for the default one, or ``--state-dir``, ``--database``, ``--config``), they open its
database directly. That is how the first admin is made (before it, the API lets nobody in
to make one) and how an operator who has lost every admin gets back in; it needs the same
rights on the database as the service, so it gives nobody more than they already have.
"""
from __future__ import annotations

import argparse
import getpass
import socket
import sys
from dataclasses import dataclass
from typing import Any, Protocol

from labmetal.cli.output import print_table
from labmetal.cli.parsing import Group, UsageError
from labmetal.client import Client, CliError, ca_bundle, server_message, unreachable

ROLES = ("admin", "teacher", "student")  # labmetal/users.py's; that module hashes at import


class Accounts(Protocol):
    def save(self, name: str, password: str | None, role: str, source: str
             ) -> dict[str, Any]: ...

    def all(self) -> list[dict[str, Any]]: ...

    def delete(self, name: str) -> None: ...


@dataclass
class ApiAccounts:
    """The accounts as /v1/users serves them."""
    client: Client

    def save(self, name: str, password: str | None, role: str, source: str
             ) -> dict[str, Any]:
        existing = {user["name"]: user for user in self.all()}
        if name not in existing:
            body = {"name": name, "role": role, "source": source,
                    **({"password": password} if source == "local" else {})}
            return self.client.call("POST", "/v1/users", json=body)
        if existing[name]["source"] != source:
            raise CliError(f"user {name} is a {existing[name]['source']} account; delete it "
                           f"first to make it a {source} one")
        change = {"role": role, **({"password": password} if source == "local" else {})}
        return self.client.call("PATCH", f"/v1/users/{name}", json=change)

    def all(self) -> list[dict[str, Any]]:
        return self.client.call("GET", "/v1/users")["users"]

    def delete(self, name: str) -> None:
        self.client.call("DELETE", f"/v1/users/{name}")


@dataclass
class LocalAccounts:
    """The accounts in the service's own database (see the module's text for when)."""
    args: argparse.Namespace

    def _db(self):
        from labmetal.cli.server import settings
        from labmetal.db import Database
        db = Database(settings(self.args).database_url)
        db.upgrade()
        return db

    def save(self, name: str, password: str | None, role: str, source: str
             ) -> dict[str, Any]:
        from labmetal.users import AccountError, find_user, set_user
        db = self._db()
        try:
            set_user(db, name, password, role, source=source)
        except AccountError as error:
            raise CliError(str(error)) from None
        return self._view(find_user(db, name))

    def all(self) -> list[dict[str, Any]]:
        from labmetal.users import list_users
        return [self._view(user) for user in list_users(self._db())]

    def delete(self, name: str) -> None:
        from labmetal.users import AccountError, delete_user
        try:
            delete_user(self._db(), name)
        except LookupError:
            raise CliError(f"no user {name}") from None
        except AccountError as error:
            raise CliError(str(error)) from None

    @staticmethod
    def _view(user: Any) -> dict[str, Any]:
        def iso(moment: Any) -> str | None:
            return moment.isoformat() if moment else None
        return {"name": user.name, "role": user.role, "source": user.source,
                "disabled": user.disabled, "created_at": iso(user.created_at),
                "last_login_at": iso(user.last_login_at)}


def accounts(client: Client, args: argparse.Namespace) -> Accounts:
    local = args.local or any((args.state_dir, args.database, args.config))
    return LocalAccounts(args) if local else ApiAccounts(client)


def cmd_user_set(client: Client, args: argparse.Namespace) -> Any:
    if args.ldap:
        password = None
    elif args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"password for {args.name}: ")
    user = accounts(client, args).save(args.name, password, args.role,
                                       "ldap" if args.ldap else "local")
    if args.json:
        return user
    print(f"user {args.name} ({args.role}{', LDAP' if args.ldap else ''}) saved")
    return None


def cmd_user_list(client: Client, args: argparse.Namespace) -> Any:
    return accounts(client, args).all()


def show_users(users: list[dict[str, Any]]) -> None:
    print_table(["NAME", "ROLE", "SOURCE", "DISABLED", "LAST LOGIN"],
                [[u["name"], u["role"], u["source"], "yes" if u["disabled"] else "",
                  (u["last_login_at"] or "")[:19].replace("T", " ")] for u in users])


def cmd_user_delete(client: Client, args: argparse.Namespace) -> Any:
    accounts(client, args).delete(args.name)
    if args.json:
        return {"deleted": args.name}
    print(f"user {args.name} deleted (and its tokens and sessions)")
    return None


def cmd_login(client: Client, args: argparse.Namespace) -> Any:
    """Trade the password for an API token once; later commands send the token."""
    import requests

    from labmetal.profile import Profile, save_profile
    if not args.url:
        raise UsageError("name the API: --url URL (or LABMETAL_URL)")
    password = (sys.stdin.readline().rstrip("\n") if args.password_stdin
                else getpass.getpass(f"password for {args.user} at {args.url}: "))
    try:
        response = requests.post(args.url.rstrip("/") + "/v1/auth/tokens", timeout=30,
                                 auth=(args.user, password), verify=ca_bundle(),
                                 json={"description": f"labmetal login on "
                                                      f"{socket.gethostname()}"})
    except requests.RequestException as error:
        raise CliError(unreachable(args.url, error)) from None
    if response.status_code != 201:
        raise CliError(f"login refused: {server_message(response)}")
    token = response.json()
    path = save_profile(Profile(args.url.rstrip("/"), args.user, token["token"],
                                token["uuid"], token["expires_at"]))
    print(f"logged in as {args.user}; token saved in {path} (expires {token['expires_at']})")
    return None


def cmd_logout(client: Client, args: argparse.Namespace) -> Any:
    import requests

    from labmetal.profile import load_profile, remove_profile
    profile = load_profile()
    if profile is None:
        print("not logged in")
        return None
    try:
        requests.delete(f"{profile.url}/v1/auth/tokens/{profile.token_uuid}", timeout=30,
                        headers={"X-Auth-Token": profile.token}, verify=ca_bundle())
    except requests.RequestException as error:
        print(f"labmetal: warning: could not revoke the token at {profile.url}: {error}",
              file=sys.stderr)
    remove_profile()
    print(f"logged out of {profile.url}")
    return None


def register(top: Group) -> None:
    here = argparse.ArgumentParser(add_help=False)
    here.add_argument("--local", action="store_true",
                      help="on the server: the service's database itself, not the API (the "
                           "first admin)")
    here.add_argument("--config", help="TOML file with a [labmetal] section (implies --local)")
    here.add_argument("--database", help="SQLAlchemy URL (implies --local)")
    here.add_argument("--state-dir", help="the service's state directory (implies --local)")

    user = top.group("user", help="user accounts (admins; --local on the server)")
    user_set = user.command("set", cmd_user_set, parents=(here,),
                            help="create a user or change its password and role")
    user_set.add_argument("name")
    user_set.add_argument("--role", default="admin", choices=ROLES)
    user_set.add_argument("--password-stdin", action="store_true",
                          help="read the password from the first line of standard input")
    user_set.add_argument("--ldap", action="store_true",
                          help="an LDAP account: no password here, the directory checks it")
    user.command("list", cmd_user_list, parents=(here,), human=show_users,
                 help="the users, their roles and sources")
    user.command("delete", cmd_user_delete, parents=(here,),
                 help="delete a user and its tokens").add_argument("name")

    login = top.command("login", cmd_login,
                        help="get an API token; later commands use it for that URL")
    login.add_argument("--user", required=True)
    login.add_argument("--password-stdin", action="store_true",
                       help="read the password from the first line of standard input")
    top.command("logout", cmd_logout, help="revoke the saved token and forget it")
