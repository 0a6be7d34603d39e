"""The lifecycles of room jobs, seats, sessions and images as data (labmetal/lifecycles.py),
the one image lookup (labmetal/lookup.py) and the shared names (labmetal/names.py).

Fast: no root, no network; the lookup uses a SQLite file made from the models."""
from __future__ import annotations

from collections import deque

import pytest

from labmetal import lifecycles as lc
from labmetal.agent import commands as agent_commands
from labmetal.db import Database
from labmetal.lifecycles import BadTransition, Lifecycle
from labmetal.lookup import (MISSING, NOT_ACTIVE, WRONG_KIND, ImageUnusable, by_name_or_uuid,
                             usable_image)
from labmetal.models import Base, Image, Room
from labmetal.names import IQN_PREFIX, is_uuid, seat_iqn, session_iqn

pytestmark = pytest.mark.fast

LIFECYCLES = [lc.ROOM_JOB, lc.ROOM_JOB_SEAT, lc.SESSION, lc.IMAGE]


def reachable(lifecycle: Lifecycle) -> set[str]:
    seen, todo = {lifecycle.initial}, deque([lifecycle.initial])
    while todo:
        for after in lifecycle.moves[todo.popleft()]:
            if after not in seen:
                seen.add(after)
                todo.append(after)
    return seen


# -- the tables hold together ------------------------------------------------------------
@pytest.mark.parametrize("lifecycle", LIFECYCLES, ids=lambda each: each.name)
def test_every_state_is_reachable_from_a_new_row(lifecycle):
    assert reachable(lifecycle) == set(lifecycle.states)


@pytest.mark.parametrize("lifecycle", LIFECYCLES, ids=lambda each: each.name)
def test_every_move_goes_to_a_known_state_and_never_stays_put(lifecycle):
    for state, after in lifecycle.moves.items():
        assert after <= lifecycle.states, state
        assert state not in after


@pytest.mark.parametrize("lifecycle, terminal", [
    (lc.ROOM_JOB, {lc.JOB_CANCELLED}),
    (lc.ROOM_JOB_SEAT, set()),  # a teacher may retry any finished seat
    (lc.SESSION, {lc.SESSION_DELETED}),
    (lc.IMAGE, {lc.IMAGE_ACTIVE}),
], ids=lambda each: getattr(each, "name", ""))
def test_terminal_states_have_no_way_out(lifecycle, terminal):
    assert lifecycle.terminal == terminal
    for state in terminal:
        assert not any(lifecycle.allows(state, after) for after in lifecycle.states)


def test_the_stored_values_never_change():
    """The database and the API carry these strings; renaming one breaks every stored row."""
    assert lc.ROOM_JOB.states == {"scheduled", "running", "done", "failed", "cancelled"}
    assert lc.ROOM_JOB_SEAT.states == {"queued", "powering", "booting", "writing",
                                       "verifying", "done", "failed", "cancelled"}
    assert lc.SESSION.states == {"stopped", "starting", "running", "syncing", "failed",
                                 "deleted"}
    assert lc.IMAGE.states == {"queued", "active"}
    assert (lc.ROOM_JOB.initial, lc.ROOM_JOB_SEAT.initial, lc.SESSION.initial,
            lc.IMAGE.initial) == ("scheduled", "queued", "stopped", "queued")
    assert lc.SEAT_IDLE == "idle" and lc.SEAT_IDLE not in lc.ROOM_JOB_SEAT.states


def test_the_named_groups_match_the_tables():
    assert set(lc.JOB_ACTIVE) == {s for s in lc.ROOM_JOB.states
                                  if lc.ROOM_JOB.allows(s, lc.JOB_CANCELLED)}
    assert set(lc.JOB_FINISHED) == lc.ROOM_JOB.states - set(lc.JOB_ACTIVE)
    assert set(lc.SEAT_FINISHED) == {s for s in lc.ROOM_JOB_SEAT.states
                                     if lc.ROOM_JOB_SEAT.allows(s, lc.SEAT_QUEUED)}
    assert set(lc.SESSION_LIVE) == lc.SESSION.states - {lc.SESSION_DELETED}
    assert set(lc.SESSION_BUSY) < set(lc.SESSION_LIVE)


# -- the stories ---------------------------------------------------------------------------
def test_a_room_job_runs_when_due_and_finishes_done_or_failed():
    lc.ROOM_JOB.check(lc.JOB_SCHEDULED, lc.JOB_RUNNING)
    lc.ROOM_JOB.check(lc.JOB_RUNNING, lc.JOB_DONE)
    lc.ROOM_JOB.check(lc.JOB_RUNNING, lc.JOB_FAILED)
    assert not lc.ROOM_JOB.allows(lc.JOB_SCHEDULED, lc.JOB_DONE)
    assert not lc.ROOM_JOB.allows(lc.JOB_RUNNING, lc.JOB_SCHEDULED)


def test_teacher_cancels_a_scheduled_or_running_job_and_it_stays_cancelled():
    for state in (lc.JOB_SCHEDULED, lc.JOB_RUNNING):
        assert lc.ROOM_JOB.allows(state, lc.JOB_CANCELLED)
    for state in (lc.JOB_DONE, lc.JOB_FAILED, lc.JOB_CANCELLED):
        assert not lc.ROOM_JOB.allows(state, lc.JOB_CANCELLED)
    with pytest.raises(BadTransition, match="the room job cannot go from cancelled to running"):
        lc.ROOM_JOB.check(lc.JOB_CANCELLED, lc.JOB_RUNNING)


def test_teacher_redeploys_failed_seat_and_its_finished_job_runs_again():
    lc.ROOM_JOB_SEAT.check(lc.SEAT_FAILED, lc.SEAT_QUEUED)
    lc.ROOM_JOB_SEAT.check(lc.SEAT_DONE, lc.SEAT_QUEUED)
    lc.ROOM_JOB.check(lc.JOB_FAILED, lc.JOB_RUNNING)
    lc.ROOM_JOB.check(lc.JOB_DONE, lc.JOB_RUNNING)
    # a seat still at work is not queued again: it is waited for
    for state in (lc.SEAT_POWERING, lc.SEAT_BOOTING, lc.SEAT_WRITING, lc.SEAT_VERIFYING):
        assert not lc.ROOM_JOB_SEAT.allows(state, lc.SEAT_QUEUED)


def test_a_seat_follows_its_node_and_a_retry_powers_it_again():
    path = [lc.SEAT_QUEUED, lc.SEAT_POWERING, lc.SEAT_BOOTING, lc.SEAT_WRITING,
            lc.SEAT_VERIFYING, lc.SEAT_DONE]
    for old, new in zip(path, path[1:], strict=False):
        lc.ROOM_JOB_SEAT.check(old, new)
    lc.ROOM_JOB_SEAT.check(lc.SEAT_WRITING, lc.SEAT_POWERING)  # an attempt failed, retried
    for state in lc.SEAT_IN_PROGRESS:
        assert lc.ROOM_JOB_SEAT.allows(state, lc.SEAT_FAILED)
        assert lc.ROOM_JOB_SEAT.allows(state, lc.SEAT_CANCELLED)
    assert not lc.ROOM_JOB_SEAT.allows(lc.SEAT_DONE, lc.SEAT_WRITING)


def test_a_student_session_starts_runs_stops_and_is_deleted_only_when_stopped():
    for old, new in [(lc.SESSION_STOPPED, lc.SESSION_STARTING),
                     (lc.SESSION_STARTING, lc.SESSION_RUNNING),
                     (lc.SESSION_RUNNING, lc.SESSION_STOPPED),
                     (lc.SESSION_STOPPED, lc.SESSION_DELETED)]:
        lc.SESSION.check(old, new)
    for busy in lc.SESSION_BUSY:
        assert not lc.SESSION.allows(busy, lc.SESSION_DELETED)


def test_a_session_whose_target_died_fails_and_starts_again_with_its_data():
    lc.SESSION.check(lc.SESSION_RUNNING, lc.SESSION_FAILED)
    lc.SESSION.check(lc.SESSION_STARTING, lc.SESSION_FAILED)  # its start was interrupted
    lc.SESSION.check(lc.SESSION_FAILED, lc.SESSION_STARTING)
    lc.SESSION.check(lc.SESSION_FAILED, lc.SESSION_STOPPED)
    lc.SESSION.check(lc.SESSION_STARTING, lc.SESSION_STOPPED)  # a refused start: as it was


def test_an_image_gets_its_data_once():
    lc.IMAGE.check(lc.IMAGE_QUEUED, lc.IMAGE_ACTIVE)
    with pytest.raises(BadTransition, match="the image cannot go from active to active"):
        lc.IMAGE.check(lc.IMAGE_ACTIVE, lc.IMAGE_ACTIVE)


# -- names -------------------------------------------------------------------------------
def test_is_uuid_takes_the_canonical_form_in_any_case():
    assert is_uuid("7c9e6679-7425-40de-944b-e07fc1f90ae7")
    assert is_uuid("7C9E6679-7425-40DE-944B-E07FC1F90AE7")
    assert not is_uuid("7c9e6679742540de944be07fc1f90ae7")
    assert not is_uuid("{7c9e6679-7425-40de-944b-e07fc1f90ae7}")
    assert not is_uuid("pc1") and not is_uuid("")


def test_the_agent_uses_the_servers_iqn_prefix():
    assert agent_commands.IQN_PREFIX == IQN_PREFIX == "iqn.2026-11.org.labmetal"
    assert seat_iqn("n1") == "iqn.2026-11.org.labmetal:n1"
    assert session_iqn("s1") == "iqn.2026-11.org.labmetal:session.s1"


# -- the one image lookup ------------------------------------------------------------------
@pytest.fixture
def db(tmp_path):
    database = Database(f"sqlite:///{tmp_path / 'lookup.db'}")
    Base.metadata.create_all(database.engine)
    with database.write() as session:
        session.add_all([
            Image(name="ubuntu", kind="whole-disk", status=lc.IMAGE_ACTIVE),
            Image(name="half", kind="whole-disk", status=lc.IMAGE_QUEUED),
            Image(name="vmlinuz", kind="kernel", status=lc.IMAGE_ACTIVE),
            Room(name="tpr-2"),
        ])
    yield database
    database.dispose()


def test_an_image_is_found_by_name_or_uuid_in_any_case(db):
    with db.read() as session:
        image = usable_image(session, "ubuntu", ("whole-disk", "partition"))
        assert usable_image(session, image.uuid.upper(), ("whole-disk",)).id == image.id
        assert usable_image(session, "vmlinuz").kind == "kernel"  # no kinds: any kind
        room = by_name_or_uuid(session, Room, "tpr-2")
        assert by_name_or_uuid(session, Room, room.uuid) is room
        assert by_name_or_uuid(session, Room, "TPR-2") is None  # names are exact


@pytest.mark.parametrize("ident, kinds, field, problem, message", [
    ("nope", ("whole-disk",), None, MISSING, "No image 'nope' in the image store"),
    ("nope", ("whole-disk",), "instance_info/image_source", MISSING,
     "instance_info/image_source: no image 'nope' in the image store"),
    ("vmlinuz", ("whole-disk", "partition"), None, WRONG_KIND,
     "Image vmlinuz is a active kernel image; expected an active whole-disk or partition "
     "image"),
    ("half", ("whole-disk",), "image", NOT_ACTIVE,
     "image: image half is a queued whole-disk image; expected an active whole-disk image"),
])
def test_an_unusable_image_says_why(db, ident, kinds, field, problem, message):
    with db.read() as session, pytest.raises(ImageUnusable) as caught:
        usable_image(session, ident, kinds, field)
    assert caught.value.problem == problem and str(caught.value) == message
    if problem != MISSING:
        assert (caught.value.name, caught.value.kind) == (ident, caught.value.image.kind)


def test_the_wrong_kind_is_told_before_missing_data(db):
    """A kind never changes; data may still come: the lasting fault is the one told."""
    with db.read() as session, pytest.raises(ImageUnusable) as caught:
        usable_image(session, "half", ("kernel",))
    assert caught.value.problem == WRONG_KIND
