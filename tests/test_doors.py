"""The door to a node's conductor (conductor/door.py) refuses the way every caller relies on,
and each refusal becomes one HTTP status in one place (api/errors.py).

Fast: a SQLite file made from the models, the real Wake-on-LAN power driver (whose checks
need no network) and the real conductor registry, with no conductor online."""
from __future__ import annotations

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select

from labmetal import states
from labmetal.api.errors import REFUSAL_STATUS, from_refusal
from labmetal import errors
from labmetal.conductor.door import Asker, NodeDoor
from labmetal.conductor.drivers import load_drivers
from labmetal.conductor.registry import ConductorRegistry
from labmetal.conductor.rpcapi import ConductorAPI
from labmetal.config import Settings
from labmetal.db import Database
from labmetal.models import Base, Node, NodeHistory, Port
from labmetal.secrets import SecretBox

pytestmark = pytest.mark.fast
ANN = Asker(user="ann")


@pytest.fixture
def db(tmp_path) -> Database:
    database = Database(f"sqlite:///{tmp_path / 'door.db'}")
    Base.metadata.create_all(database.engine)
    return database


@pytest.fixture
def door(db, tmp_path) -> NodeDoor:
    settings = Settings(state_dir=tmp_path)
    registry = ConductorRegistry(db, settings.conductor_dead_after)
    return NodeDoor(settings.deploy, db, load_drivers(settings.power),
                    SecretBox(Fernet.generate_key()),
                    ConductorAPI(db, registry, settings.conductor))


def add_node(db: Database, state: str, mac: str | None = "52:54:00:12:34:56",
             reservation: str | None = None) -> Node:
    with db.write() as session:
        node = Node(name="pc1", driver="wol", provision_state=state, reservation=reservation)
        session.add(node)
        session.flush()
        if mac:
            session.add(Port(address=mac, node_id=node.id))
        session.flush()
        session.expunge(node)
        return node


def test_a_verb_the_state_does_not_allow_is_refused_with_the_allowed_ones(db, door):
    node = add_node(db, states.AVAILABLE)
    with pytest.raises(errors.InvalidRequest, match="Allowed verbs in this state: active, "
                                                     "deploy, manage"):
        door.provision(node, "provide", ANN)


def test_a_deploy_without_an_image_is_refused_before_anything_is_locked(db, door):
    node = add_node(db, states.AVAILABLE)
    with pytest.raises(errors.InvalidRequest, match="deploy ramdisk"):
        door.provision(node, "deploy", ANN)
    with db.read() as session:
        assert session.get(Node, node.id).reservation is None


def test_power_credentials_that_cannot_work_are_refused_with_the_drivers_reason(db, door):
    node = add_node(db, states.ENROLL, mac=None)
    with pytest.raises(errors.InvalidRequest, match="Cannot manage node .*needs the node's "
                                                     "MAC address"):
        door.provision(node, "manage", ANN)
    assert "MAC address" in (door.power_problem(node) or "")


def test_wake_on_lan_cannot_power_off_out_of_band(db, door):
    node = add_node(db, states.AVAILABLE)
    with pytest.raises(errors.InvalidRequest, match="Wake-on-LAN can only power a node on"):
        door.set_power(node, states.POWER_OFF, ANN)


def test_work_for_a_conductor_with_none_online_is_refused_and_nothing_changes(db, door):
    node = add_node(db, states.ENROLL)
    with pytest.raises(errors.NoConductor, match="no conductor is online"):
        door.provision(node, "manage", ANN)
    with db.read() as session:
        row = session.get(Node, node.id)
        assert (row.provision_state, row.reservation) == (states.ENROLL, None)


def test_a_change_without_hardware_applies_at_once_and_is_recorded(db, door):
    node = add_node(db, states.AVAILABLE)
    door.provision(node, "manage", ANN)
    with db.read() as session:
        assert session.get(Node, node.id).provision_state == states.MANAGEABLE
        events = session.scalars(select(NodeHistory.event)).all()
    assert events == ["'manage' requested: available -> manageable"]


def test_a_locked_node_names_its_holder(db, door):
    node = add_node(db, states.AVAILABLE, reservation="conductor-2")
    with pytest.raises(errors.NodeLocked, match="locked by host conductor-2") as refused:
        door.provision(node, "manage", ANN)
    assert refused.value.holder == "conductor-2"


def test_a_node_that_changed_meanwhile_is_not_acted_on(db, door):
    node = add_node(db, states.AVAILABLE)
    with db.write() as session:
        session.get(Node, node.id).provision_state = states.MANAGEABLE
    with pytest.raises(errors.Unchanged, match="changed state while the request was made"):
        door.provision(node, "manage", ANN)  # node still says "available"


def _subclasses(kind: type) -> set[type]:
    found = set(kind.__subclasses__())
    for sub in list(found):
        found |= _subclasses(sub)
    return found


def test_every_refusal_has_its_http_status_and_keeps_its_words():
    statuses = {kind: status for kind, status in REFUSAL_STATUS}
    for kind in _subclasses(errors.Refused):
        mapped = [status for base, status in statuses.items() if issubclass(kind, base)]
        assert mapped, f"{kind.__name__} has no HTTP status in api/errors.REFUSAL_STATUS"
    assert from_refusal(errors.NodeLocked("n1", "c2")).status == 409
    assert from_refusal(errors.NoConductor("none online")).status == 503
    assert from_refusal(errors.NotFound("Room X could not be found.")).message == \
        "Room X could not be found."
