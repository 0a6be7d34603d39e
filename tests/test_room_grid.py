"""The teacher's room grid follows the seats being deployed from their nodes (issue 17): it
does not wait for the job's conductor to copy their state into the job, so it goes on moving
while that conductor is being taken over (about conductor_dead_after) or busy. The
application as `labmetal api` builds it, on a real SQLite database, no conductor running:
exactly the moment of a takeover, when nobody advances the job."""
from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from labmetal.api.app import Services, create_app
from labmetal.config import Settings
from labmetal.db import Database
from labmetal.models import Node, Room, RoomJob, RoomJobSeat, Seat, utcnow
from labmetal.secrets import SecretBox

pytestmark = pytest.mark.fast


def test_the_grid_shows_a_seats_progress_from_its_node_while_no_conductor_advances_the_job(
        tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'grid.db'}")
    db.upgrade()
    with db.write() as session:
        room = Room(name="tpr-9")
        session.add(room)
        nodes = [Node(name=f"pc{i}", driver="ipmi", provision_state="deploying",
                      agent_url="http://10.99.9.11:9999",
                      deploy_step={"step": "write_image", "total": 100, "done": 40 * i})
                 for i in (1, 2)]
        nodes.append(Node(name="pc3", driver="ipmi", provision_state="active"))
        session.add_all(nodes)
        session.flush()
        job = RoomJob(room_id=room.id, action="deploy", image_name="debian12",
                      state="running", owner="a-conductor-that-died", started_at=utcnow())
        session.add(job)
        session.flush()
        for index, node in enumerate(nodes, start=1):
            session.add(Seat(room_id=room.id, label=f"A0{index}", node_id=node.id))
            # the job's rows as its conductor last wrote them, before it died
            session.add(RoomJobSeat(job_id=job.id, node_id=node.id, label=f"A0{index}",
                                    state="powering" if index < 3 else "done",
                                    progress=0 if index < 3 else 100, requested_at=utcnow()))
    settings = Settings(auth="noauth", state_dir=tmp_path)
    client = create_app(Services(settings, db, None, None, {},
                                 SecretBox(Fernet.generate_key()))).test_client()

    grid = client.get("/v1/rooms/tpr-9").get_json()
    shown = {seat["label"]: (seat["state"], seat["progress"]) for seat in grid["seats"]}
    assert shown == {"A01": ("writing", 40), "A02": ("writing", 80), "A03": ("done", 100)}
    # the job's own rows are left to its conductor
    assert [(s["state"], s["progress"]) for s in grid["job"]["seats"]] == \
        [("powering", 0), ("powering", 0), ("done", 100)]

    with db.write() as session:  # the node finishes: the grid says so at once
        node = session.query(Node).filter_by(name="pc1").one()
        node.provision_state, node.deploy_step = "active", {}
    grid = client.get("/v1/rooms/tpr-9").get_json()
    assert (grid["seats"][0]["state"], grid["seats"][0]["progress"]) == ("done", 100)
