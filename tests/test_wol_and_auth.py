"""Wake-on-LAN power with real magic packets, and HTTP basic auth with the baremetal CLI."""
from __future__ import annotations

import json
import socket
import subprocess

from labmetal.lab.harness import LABMETAL, error_text, start_service, wait_for


def test_wol_node_is_woken_by_a_magic_packet_and_power_off_is_refused_clearly(procs,
                                                                              baremetal_for):
    service = start_service(procs, "wol")
    cli = baremetal_for(service.url)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        wol_port = probe.getsockname()[1]
    listener = procs.start([LABMETAL, "lab", "wol", "--address", "127.0.0.1", "--port",
                            str(wol_port)], "wol-listener")
    listener.wait_for_output("listening for magic packets")

    cli("node", "create", "--driver", "wol", "--name", "pc7", "--driver-info",
        "wol_host=127.0.0.1", "--driver-info", f"wol_port={wol_port}")
    result = cli("node", "manage", "pc7", "--wait", "30", check=False)
    assert result.returncode != 0 and "add a port" in result.stderr  # no MAC, nothing to wake
    cli("port", "create", "52:54:00:12:34:56", "--node", "pc7")
    cli("port", "create", "52:54:00:12:34:57", "--node", "pc7")
    cli("node", "manage", "pc7", "--wait", "30")
    assert cli.json("node", "show", "pc7")["power_state"] is None  # unknown until woken

    cli("node", "power", "on", "pc7")
    wait_for(lambda: listener.output().count("woke") >= 2, 10, "two magic packets")
    woken = {json.loads(line)["woke"] for line in listener.output().splitlines()
             if line.startswith("{")}
    assert woken == {"52:54:00:12:34:56", "52:54:00:12:34:57"}
    node = service.wait_node("pc7", lambda n: n["power_state"] == "power on")
    assert node["driver_internal_info"]["power_state_assumed"] is True
    assert "assumed" in service.history("pc7")[-1]["event"]

    for verb in ("off", "reboot"):
        result = cli("node", "power", verb, "pc7", check=False) if verb == "off" else cli(
            "node", "reboot", "pc7", check=False)
        assert result.returncode != 0
        assert "Wake-on-LAN can only power a node on" in result.stderr
    assert service.node("pc7")["power_state"] == "power on"


def test_http_basic_users_and_the_baremetal_cli(procs, baremetal_for, tmp_path):
    state_dir = tmp_path / "auth-state"
    added = subprocess.run([LABMETAL, "user", "set", "alice", "--role", "admin",
                            "--password-stdin", "--state-dir", str(state_dir)],
                           input="correct horse\n", capture_output=True, text=True)
    assert added.returncode == 0, added.stderr
    service = start_service(procs, "auth", auth="http_basic", state_dir=state_dir)

    alice = baremetal_for(service.url, "alice", "correct horse")
    alice("node", "create", "--driver", "wol", "--name", "pc1")
    assert [n["name"] for n in alice.json("node", "list")] == ["pc1"]

    mallory = baremetal_for(service.url, "alice", "wrong")
    result = mallory("node", "list", check=False)
    assert result.returncode != 0 and "401" in result.stderr
    anonymous = service.get("/v1/nodes")
    assert anonymous.status_code == 401 and "Authentication required" in error_text(anonymous)
    assert anonymous.headers["WWW-Authenticate"].startswith("Basic")
    assert service.get("/").status_code == 200  # version discovery stays public
    assert service.get("/v1/nodes", auth=("alice", "correct horse")).status_code == 200
    assert "correct horse" not in (procs.workdir / "auth.service.log").read_text()
