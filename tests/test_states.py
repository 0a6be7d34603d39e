"""Ironic's provision states and verbs (labmetal/states.py), as tables: every verb leads
somewhere known, a failure lands in a state a verb leaves, and the ramdisk is booted exactly
where the conductor works with the agent (the engine at work: tests/test_enrollment.py and
the deploy tests)."""
from __future__ import annotations

import pytest

from labmetal import states as s

pytestmark = pytest.mark.fast

STABLE = {s.ENROLL, s.MANAGEABLE, s.AVAILABLE, s.ACTIVE, s.CLEAN_FAILED, s.DEPLOY_FAILED,
          s.INSPECT_FAILED}


def test_the_usual_life_of_a_node():
    state, path = s.ENROLL, []
    for verb in ("manage", "provide", "deploy", "undeploy"):
        step = s.transition(state, verb)
        assert step is not None, (state, verb)
        state = step.target or step.state
        path.append(state)
    assert path == [s.MANAGEABLE, s.AVAILABLE, s.ACTIVE, s.AVAILABLE]
    assert s.transition(s.ACTIVE, "deploy") is None  # rebuild, not deploy
    assert s.transition(s.ENROLL, "deploy") is None
    assert s.allowed_verbs(s.ACTIVE) == ["deleted", "rebuild", "undeploy"]
    assert s.allowed_verbs(s.DEPLOYING) == []  # busy: nothing until the conductor is done


def test_every_verb_starts_and_ends_in_a_known_state():
    for (start, verb), step in s.PROVISION_VERBS.items():
        assert start in STABLE | set(s.AGENT_WAIT), (start, verb)
        if step.target is None:  # done at once: a stable state, no work for the conductor
            assert step.state in STABLE and step.action is None, (start, verb)
        else:  # the conductor works in step.state towards a stable target
            assert step.target in STABLE and step.action, (start, verb)
            assert step.state in s.FAILURE_STATE, (start, verb)


def test_failures_land_where_a_verb_gets_the_node_out():
    for working, failed in s.FAILURE_STATE.items():
        assert s.allowed_verbs(failed), f"{working} fails into {failed}, a dead end"
    for waiting, working in s.AGENT_WAIT.items():
        assert waiting in s.FAILURE_STATE and working in s.FAILURE_STATE
        assert s.allowed_verbs(waiting) == ["abort"]


def test_the_ramdisk_is_booted_while_the_conductor_works_with_the_agent():
    assert set(s.RAMDISK_MODE) == s.BOOTS_RAMDISK
    assert set(s.AGENT_WAIT) <= s.BOOTS_RAMDISK
    assert not s.BOOTS_RAMDISK & STABLE
    assert s.DELETABLE <= STABLE and s.ACTIVE not in s.DELETABLE
    assert set(s.POWER_TARGETS.values()) == {s.POWER_ON, s.POWER_OFF}
