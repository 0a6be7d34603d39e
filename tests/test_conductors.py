"""Several conductors on a real PostgreSQL share nodes by hash ring; when one dies (SIGKILL)
its nodes are taken over and every accepted action completes. A restarted all-in-one
service resumes what it was doing."""
from __future__ import annotations

import concurrent.futures
import time
from datetime import datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from labmetal.db import Database
from labmetal.models import Base
from labmetal.secrets import SecretBox
from labmetal.lab.harness import (ipmitool_power, start_bmcs, start_conductor, start_service,
                                  wait_for)

LATEST = {"X-OpenStack-Ironic-API-Version": "latest"}
NODES = 60


def all_nodes(service) -> list[dict]:
    return service.get("/v1/nodes/detail", headers=LATEST).json()["nodes"]


def enroll_many(service, first_port: int, count: int) -> None:
    def enroll(i: int) -> None:
        response = service.post("/v1/nodes", {
            "driver": "ipmi", "name": f"pc{i:02d}",
            "driver_info": {"ipmi_address": "127.0.0.1", "ipmi_port": first_port + i,
                            "ipmi_username": "admin", "ipmi_password": "s3cret"}})
        assert response.status_code == 201, response.text
        assert service.put(f"/v1/nodes/pc{i:02d}/states/provision",
                           {"target": "manage"}).status_code == 202

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(enroll, range(count)))
    wait_for(lambda: all(n["provision_state"] == "manageable" and not n["reservation"]
                         for n in all_nodes(service)), 60, "every node manageable")


@pytest.mark.postgres
def test_migrations_match_the_models_on_postgresql(postgres):
    db = Database(postgres.new_database("schema"))
    db.upgrade()
    with db.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    db.dispose()


@pytest.mark.postgres
def test_a_killed_conductors_nodes_are_taken_over_and_every_action_completes(postgres, procs,
                                                                             tmp_path):
    database = postgres.new_database("takeover")
    key = tmp_path / "secret.key"
    SecretBox.from_file(key)
    first_port = start_bmcs(procs, NODES, power_delay=1.0)
    conductors = {name: start_conductor(procs, name, database, key) for name in ("c1", "c2", "c3")}
    api = start_service(procs, "api", command="api", database=database, secret_key_file=key)
    wait_for(lambda: len([c for c in api.get("/v1/conductors", headers=LATEST).json()["conductors"]
                          if c["alive"]]) == 3, 20, "three live conductors")
    enroll_many(api, first_port, NODES)

    owners = {n["name"]: n["conductor"] for n in all_nodes(api)}
    assert set(owners.values()) == {"c1", "c2", "c3"}
    victims = {name for name, owner in owners.items() if owner == "c2"}

    def power_on(name: str) -> int:
        return api.put(f"/v1/nodes/{name}/states/power", {"target": "power on"}).status_code

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(power_on, sorted(owners)))
    assert codes == [202] * NODES
    conductors["c2"].kill()  # mid-way: its BMCs need a second to power on
    killed_at = datetime.utcnow()
    pending = [n for n in all_nodes(api) if n["reservation"] == "c2"]
    assert pending, "c2 finished everything before it was killed; the test proved nothing"

    try:
        wait_for(lambda: all(n["power_state"] == "power on" and not n["reservation"]
                             and not n["target_power_state"] for n in all_nodes(api)),
                 60, "every accepted power-on done")
    except AssertionError:
        for n in all_nodes(api):
            print(n["name"], n["power_state"], n["reservation"], n["last_error"])
        raise
    for i in range(NODES):
        assert ipmitool_power(first_port + i) == "Chassis Power is on"

    takeovers = []
    for node in pending:
        events = [e for e in api.history(node["uuid"]) if e["event_type"] == "conductor"]
        assert len(events) == 1 and "conductor c2 is gone" in events[0]["event"]
        assert events[0]["conductor"] in ("c1", "c3")
        taken = datetime.fromisoformat(events[0]["created_at"]).replace(tzinfo=None)
        takeovers.append((taken - killed_at).total_seconds())
    assert max(takeovers) < 20, takeovers

    listed = {c["hostname"]: c["alive"] for c in
              api.get("/v1/conductors", headers=LATEST).json()["conductors"]}
    assert listed == {"c1": True, "c2": False, "c3": True}
    new_owners = {n["name"]: n["conductor"] for n in all_nodes(api)}
    assert {new_owners[name] for name in victims} <= {"c1", "c3"}
    assert all(new_owners[n] == owners[n] for n in owners if n not in victims)

    # the survivors keep serving the dead conductor's nodes
    victim = sorted(victims)[0]
    assert api.put(f"/v1/nodes/{victim}/states/power", {"target": "power off"}).status_code == 202
    api.wait_node(victim, lambda n: n["power_state"] == "power off" and not n["reservation"])


def test_a_restarted_service_resumes_the_actions_it_had_accepted(procs, tmp_path):
    first_port = start_bmcs(procs, 4, power_delay=3.0)
    state_dir = tmp_path / "restart-state"
    service = start_service(procs, "before", state_dir=state_dir, hostname="pc-room")
    enroll_many(service, first_port, 4)
    for i in range(4):
        assert service.put(f"/v1/nodes/pc{i:02d}/states/power",
                           {"target": "power on"}).status_code == 202
    time.sleep(0.5)
    service.proc.kill()  # SIGKILL while the machines are still coming up
    locked = [n["name"] for n in _read_nodes(state_dir) if n["reservation"] == "pc-room"]
    assert locked, "nothing was in progress at the kill; the test proved nothing"

    service = start_service(procs, "after", state_dir=state_dir, hostname="pc-room")
    wait_for(lambda: all(n["power_state"] == "power on" and not n["reservation"]
                         for n in all_nodes(service)), 60, "the interrupted actions resumed")
    for i in range(4):
        assert ipmitool_power(first_port + i) == "Chassis Power is on"


def _read_nodes(state_dir) -> list[dict]:
    from sqlalchemy import select

    from labmetal.models import Node
    db = Database(f"sqlite:///{state_dir / 'labmetal.db'}")
    with db.read() as session:
        rows = [{"name": n.name, "reservation": n.reservation}
                for n in session.scalars(select(Node))]
    db.dispose()
    return rows


@pytest.mark.postgres
def test_a_database_outage_everyone_shared_moves_nothing_and_a_real_death_is_still_taken_over(
        postgres, procs, tmp_path):
    """PostgreSQL stopped for longer than conductor_dead_after: every conductor's heartbeat
    is old when it comes back, but nobody died; no room job changes owner. A conductor
    killed after that is still taken over."""
    database = postgres.new_database("outage_ring")
    key = tmp_path / "secret.key"
    SecretBox.from_file(key)
    conductors = {name: start_conductor(procs, name, database, key) for name in ("c1", "c2")}
    api = start_service(procs, "api", command="api", database=database, secret_key_file=key)
    wait_for(lambda: len([c for c in api.get("/v1/conductors", headers=LATEST).json()
                          ["conductors"] if c["alive"]]) == 2, 30, "two live conductors")
    assert api.post("/v1/rooms", {"name": "R1"}).status_code == 201
    assert api.post("/v1/rooms/R1/import", None, data=b"seat,mac\nA01,52:54:00:17:00:01\n",
                    headers={"Content-Type": "text/csv"}).status_code == 200
    jobs = [api.post("/v1/rooms/R1/jobs", {"action": "power-off", "at": "23:59"}).json()["uuid"]
            for _ in range(8)]  # scheduled: each owned by a conductor until it runs

    def owners() -> dict[str, str | None]:
        return {uuid: api.get(f"/v1/room-jobs/{uuid}").json()["conductor"] for uuid in jobs}

    before = wait_for(lambda: (lambda got: got if all(got.values()) else None)(owners()), 30,
                      "every job owned")
    assert set(before.values()) == {"c1", "c2"}, before

    postgres.halt()
    try:
        time.sleep(15)  # the outage itself: longer than conductor_dead_after (10 s)
    finally:
        postgres.resume()
    wait_for(lambda: api.get("/v1/rooms").ok, 60, "the database back")
    wait_for(lambda: len([c for c in api.get("/v1/conductors", headers=LATEST).json()
                          ["conductors"] if c["alive"]]) == 2, 60, "both conductors beating")
    time.sleep(12)  # a grace longer than the rule: what the first one back would have taken
    assert owners() == before
    for name in conductors:
        log = (procs.workdir / f"{name}.service.log").read_text()
        assert "the database answers again" in log and "is gone" not in log, name

    # a real death after that is taken over as before
    victim = before[jobs[0]]
    conductors[victim].kill()
    survivor = ({"c1", "c2"} - {victim}).pop()
    wait_for(lambda: set(owners().values()) == {survivor}, 60, "the dead one's jobs taken over")
