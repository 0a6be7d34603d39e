"""Who may do what: every API action maps to the roles allowed (Keystone's policy.json idea).

A rule is a list of entries, each a role (``"teacher"``: on anything) or a role limited to
its own objects (``"student:owner"``: only sessions, users, tokens... that are the caller's).
Only actions whose objects have an owner accept ``:owner``. The defaults below are safe on
their own; a policy file (JSON or TOML, ``{"action": ["role", ...]}``) replaces the rule of
each action it names. A file naming an unknown action or role is refused at start-up.
The README's table of the defaults ("Accounts and policy") is compared with ACTIONS by
tests/test_policy_rules.py: change both together.
"""
from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Mapping

from labmetal.users import ROLES

OWNER_SUFFIX = ":owner"
ADMIN, TEACHER, STUDENT = "admin", "teacher", "student"
STAFF = (ADMIN, TEACHER)
OWN = (f"{TEACHER}{OWNER_SUFFIX}", f"{STUDENT}{OWNER_SUFFIX}")


@dataclass(frozen=True)
class Action:
    name: str
    default: tuple[str, ...]
    ownable: bool = False  # its objects belong to a user, so "role:owner" makes sense
    description: str = ""


ACTIONS: dict[str, Action] = {action.name: action for action in (
    # Nodes, ports, drivers, conductors: the room's PCs. Teachers see them and act on their
    # state (power, re-image a seat); enrolling and changing them is the admins'.
    Action("node:get", STAFF, description="list and show nodes, their states"),
    Action("node:create", (ADMIN,), description="enroll a node"),
    Action("node:update", (ADMIN,), description="change a node's fields (JSON patch)"),
    Action("node:delete", (ADMIN,), description="delete a node"),
    Action("node:validate", STAFF, description="check a node's driver settings"),
    Action("node:set_power_state", STAFF, description="power on, off, reboot"),
    Action("node:set_provision_state", STAFF, description="manage, provide, deploy, rebuild, "
                                                          "undeploy, inspect, abort"),
    Action("node:set_maintenance", (ADMIN,), description="set or clear maintenance"),
    Action("node:history:get", STAFF, description="a node's event history"),
    Action("node:capture", STAFF, description="capture a reference PC's disk as an image"),
    Action("port:get", STAFF),
    Action("port:create", (ADMIN,)),
    Action("port:update", (ADMIN,)),
    Action("port:delete", (ADMIN,)),
    Action("driver:get", STAFF),
    Action("conductor:get", (ADMIN,)),
    # Images: teachers pick them for rooms and templates; admins register them.
    Action("image:get", STAFF, description="list and show images and manifests"),
    Action("image:create", (ADMIN,), description="register an image"),
    Action("image:upload", (ADMIN,), description="upload an image's data"),
    Action("image:delete", (ADMIN,)),
    # Rooms and templates (api/rooms.py, api/sessions.py): teachers run rooms and make TP
    # templates, students see templates; admins define rooms.
    Action("room:get", STAFF),
    Action("room:create", (ADMIN,)),
    Action("room:update", (ADMIN,)),
    Action("room:delete", (ADMIN,)),
    Action("room:deploy", STAFF, description="boot a room's seats into an image or template"),
    Action("room:power", STAFF, description="power a room's seats on or off"),
    Action("template:get", (ADMIN, TEACHER, STUDENT)),
    Action("template:create", STAFF),
    Action("template:update", STAFF),
    Action("template:delete", STAFF),
    # Student sessions: a student's own saved disk state. Teachers see everyone's and take
    # copies of them (to keep or grade); changing one is its student's (README, "Accounts
    # and policy": a policy file can give teachers more).
    Action("session:get", (ADMIN, TEACHER, OWN[1]), ownable=True,
           description="list and show sessions"),
    Action("session:create", (ADMIN, OWN[1]), ownable=True,
           description="make a session of a template"),
    Action("session:resume", (ADMIN, OWN[1]), ownable=True,
           description="start a session on a seat (powering it on), stop it"),
    Action("session:save", (ADMIN, OWN[1]), ownable=True),
    Action("session:reset", (ADMIN, OWN[1]), ownable=True,
           description="back to the template, or to a save point (revert)"),
    Action("session:delete", (ADMIN, OWN[1]), ownable=True),
    Action("session:export", (ADMIN, TEACHER, OWN[1]), ownable=True,
           description="download a copy of a session's disk (teachers: anyone's)"),
    # Accounts: admins manage users; everybody reads themself and changes their password.
    Action("user:list", (ADMIN,)),
    Action("user:get", (ADMIN, *OWN), ownable=True),
    Action("user:create", (ADMIN,)),
    Action("user:update", (ADMIN, *OWN), ownable=True,
           description="as owner: only one's own password, with the old one"),
    Action("user:delete", (ADMIN,)),
    # API tokens are always the caller's own; admins may revoke anyone's.
    Action("token:create", (ADMIN, TEACHER, STUDENT)),
    Action("token:list", (ADMIN, TEACHER, STUDENT), description="one's own tokens"),
    Action("token:delete", (ADMIN, *OWN), ownable=True),
)}


class Verdict(Enum):
    REFUSED = "refused"
    ALLOWED = "allowed"
    OWN_ONLY = "own only"  # allowed if the object is the caller's


@dataclass(frozen=True)
class Rule:
    roles: frozenset[str]
    owner_roles: frozenset[str]

    def verdict(self, role: str) -> Verdict:
        if role in self.roles:
            return Verdict.ALLOWED
        return Verdict.OWN_ONLY if role in self.owner_roles else Verdict.REFUSED


def parse_rule(action: Action, entries: Any) -> tuple[Rule | None, list[str]]:
    """The rule, or the problems with it (every one, so a file is fixed in one go)."""
    if not isinstance(entries, (list, tuple)) or not all(isinstance(e, str) for e in entries):
        return None, [f"{action.name}: expected a list of roles, got {entries!r}"]
    roles: set[str] = set()
    owner_roles: set[str] = set()
    problems: list[str] = []
    for entry in entries:
        role, owned = (entry[:-len(OWNER_SUFFIX)], True) if entry.endswith(OWNER_SUFFIX) \
            else (entry, False)
        if role not in ROLES:
            problems.append(f"{action.name}: unknown role {role!r} (roles: {', '.join(ROLES)})")
        elif owned and not action.ownable:
            problems.append(f"{action.name}: {entry!r}: this action's objects have no owner")
        else:
            (owner_roles if owned else roles).add(role)
    return Rule(frozenset(roles), frozenset(owner_roles - roles)), problems


@dataclass(frozen=True)
class Policy:
    rules: Mapping[str, Rule]

    @classmethod
    def defaults(cls) -> Policy:
        return cls.with_overrides({})

    @classmethod
    def with_overrides(cls, overrides: Mapping[str, Any], source: str = "policy") -> Policy:
        problems = [f"unknown action {name!r}" for name in sorted(set(overrides) - set(ACTIONS))]
        rules: dict[str, Rule] = {}
        for action in ACTIONS.values():
            rule, found = parse_rule(action, overrides.get(action.name, action.default))
            problems += found
            if rule is not None:  # else its problems are reported below
                rules[action.name] = rule
        if problems:
            raise ValueError(f"{source}: " + "; ".join(problems))
        return cls(rules)

    @classmethod
    def load(cls, path: Path | None) -> Policy:
        """The defaults, with the file's rules in place of theirs (JSON, or TOML)."""
        if path is None:
            return cls.defaults()
        path = Path(path)
        with open(path, "rb") as fh:
            overrides = json.load(fh) if path.suffix == ".json" else tomllib.load(fh)
        if not isinstance(overrides, dict):
            raise ValueError(f"{path}: expected an object mapping actions to lists of roles")
        return cls.with_overrides(overrides, source=str(path))

    def verdict(self, action: str, role: str) -> Verdict:
        return self.rules[action].verdict(role)

    def table(self) -> dict[str, list[str]]:
        """The rules in the file's own format (for documentation and `policy show`)."""
        return {name: sorted(rule.roles, key=ROLES.index)
                + [f"{role}{OWNER_SUFFIX}" for role in sorted(rule.owner_roles, key=ROLES.index)]
                for name, rule in self.rules.items()}
