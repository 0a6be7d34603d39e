"""The policy's rules without a service: every endpoint of the application is checked by an
action or public by name, the defaults give each role what it should, and the README's table
of the defaults says what the code does (it fails when either drifts)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from labmetal.policy import ACTIONS, Policy, Verdict
from tests.test_policy import PUBLIC_ENDPOINTS, endpoints

pytestmark = pytest.mark.fast

README = Path(__file__).resolve().parents[1] / "README.md"
CELLS = {"yes": Verdict.ALLOWED, "no": Verdict.REFUSED, "own": Verdict.OWN_ONLY}


def readme_policy_table() -> dict[str, dict[str, Verdict]]:
    """{action: {role: verdict}} from the table under README's "Accounts and policy".

    A row names its actions in backquotes; `port:create/update/delete` is three of them."""
    section = README.read_text().split("\n## Accounts and policy\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert header[0] == "actions", header
    roles = header[1:]
    table: dict[str, dict[str, Verdict]] = {}
    for row in rows[2:]:  # after the header and its |---| line
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        for named in re.findall(r"`([^`]+)`", cells[0]):
            prefix, _, verbs = named.rpartition(":")
            for verb in verbs.split("/"):
                action = f"{prefix}:{verb}"
                assert action not in table, f"{action} is in two rows of the README's table"
                table[action] = {role: CELLS[cell] for role, cell in zip(roles, cells[1:],
                                                                         strict=True)}
    return table


def test_the_readme_table_of_the_defaults_is_the_codes():
    table = readme_policy_table()
    assert set(table) == set(ACTIONS), (f"not in the README: {sorted(set(ACTIONS) - set(table))}"
                                        f"; not in the code: {sorted(set(table) - set(ACTIONS))}")
    policy = Policy.defaults()
    differ = [f"{action} {role}: README {verdict.value}, code "
              f"{policy.verdict(action, role).value}"
              for action, verdicts in table.items() for role, verdict in verdicts.items()
              if policy.verdict(action, role) is not verdict]
    assert not differ, differ


def test_the_table_round_trips_and_owner_entries_need_an_owned_action():
    policy = Policy.defaults()
    assert Policy.with_overrides(policy.table()) == policy
    assert policy.table()["session:get"] == ["admin", "teacher", "student:owner"]
    teachers_reset = Policy.with_overrides({"session:reset": ["admin", "teacher",
                                                              "student:owner"]})
    assert teachers_reset.verdict("session:reset", "teacher") is Verdict.ALLOWED
    assert teachers_reset.verdict("session:reset", "student") is Verdict.OWN_ONLY
    # a role both plainly and as owner: allowed on anything
    both = Policy.with_overrides({"user:get": ["teacher", "teacher:owner"]})
    assert both.verdict("user:get", "teacher") is Verdict.ALLOWED
    with pytest.raises(ValueError, match="node:get: 'teacher:owner': this action's objects"):
        Policy.with_overrides({"node:get": ["teacher:owner"]})
    with pytest.raises(ValueError, match="expected a list of roles"):
        Policy.with_overrides({"node:get": "admin"})


def test_every_endpoint_is_public_by_name_or_checked_by_the_policy(tmp_path):
    routes, app = endpoints(tmp_path)
    unchecked, unknown = [], []
    for endpoint, method, rule in routes:
        view = app.view_functions[endpoint]
        action = getattr(view, "policy_action", None)
        if endpoint in PUBLIC_ENDPOINTS:
            assert hasattr(view, "public_reason"), f"{endpoint} is listed public, not marked"
            assert action is None
        elif action is None:
            unchecked.append(f"{method} {rule} ({endpoint})")
        elif action not in ACTIONS:
            unknown.append(f"{method} {rule}: {action}")
    assert not unchecked, f"endpoints with no policy check: {unchecked}"
    assert not unknown
    marked = {e for e, v in app.view_functions.items() if hasattr(v, "public_reason")}
    assert marked == PUBLIC_ENDPOINTS


def test_default_policy_students_own_sessions_teachers_rooms_admins_enroll():
    policy = Policy.defaults()
    assert policy.verdict("session:get", "student") is Verdict.OWN_ONLY
    assert policy.verdict("session:resume", "student") is Verdict.OWN_ONLY
    assert policy.verdict("session:resume", "teacher") is Verdict.REFUSED
    for action in ("room:deploy", "room:power", "template:create", "node:set_provision_state",
                   "node:set_power_state", "node:capture"):
        assert policy.verdict(action, "teacher") is Verdict.ALLOWED, action
        assert policy.verdict(action, "student") is Verdict.REFUSED, action
    for action in ("node:create", "node:delete", "image:create", "image:upload", "user:create",
                   "room:create", "port:create"):
        assert policy.verdict(action, "admin") is Verdict.ALLOWED, action
        assert policy.verdict(action, "teacher") is Verdict.REFUSED, action
    assert policy.verdict("user:update", "student") is Verdict.OWN_ONLY
    assert all(policy.verdict(name, "admin") is Verdict.ALLOWED for name in ACTIONS)

