"""`labmetal lab up|down|status`: a simulated room a teacher runs next to labmetal. Real
parts only: namespaces, taps, QEMU guests with iPXE, virtual BMCs driven by ipmitool, Wake-
on-LAN magic packets, labmetal's dnsmasq and HTTP boot scripts."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import wakeonlan

from labmetal.lab.network import namespaces
from labmetal.lab.room import STATE_FILE
from labmetal.lab.served import BMC_PASSWORD, UpRoom, lab_up, start_labmetal, tear_down
from labmetal.lab.harness import LABMETAL, Processes, free_port, wait_for


@pytest.fixture
def rooms(procs: Processes, tmp_path: Path):
    """Starts `labmetal lab up`; whatever happens, its rooms go away: SIGTERM to the
    process (it tears down), then anything a crash left (namespaces by its PID)."""
    started: list[UpRoom] = []

    def up(name: str, subnet: str, *options: str, state_dir: Path | None = None) -> UpRoom:
        room = lab_up(procs, state_dir or tmp_path / name, name, subnet, "--disk-mib", "64",
                      *options, log_name=f"lab-up-{len(started)}")
        started.append(room)
        return room

    yield up
    for room in reversed(started):
        tear_down(room)


def lab(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([LABMETAL, "lab", *args], capture_output=True, text=True,
                            timeout=120)
    assert not check or result.returncode == 0, result.stdout + result.stderr
    return result


def status(room: UpRoom) -> dict[str, dict[str, Any]]:
    report = json.loads(lab("status", "--state-dir", str(room.state_dir), "--json").stdout)
    return {seat["name"]: seat for seat in report["seats"]}


def ipmitool(port: int, *command: str) -> str:
    result = subprocess.run(["ipmitool", "-I", "lanplus", "-H", "127.0.0.1", "-p", str(port),
                             "-U", "admin", "-P", BMC_PASSWORD, *command],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def running_parts(state: dict[str, Any]) -> list[str]:
    """What of this run of `lab up` still exists: namespaces, the uplink, its children."""
    found = [ns for ns in namespaces() if ns.startswith(f"lmt-{state['pid']}-")]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    found += [state["uplink"]] if f" {state['uplink']}@" in links else []
    return found + [f"pid {pid}" for pid, _ in state["processes"].values()
                    if Path(f"/proc/{pid}").exists() and "Z" not in
                    Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]]


def leftovers(state: dict[str, Any]) -> list[str]:
    """All of it, and the QEMU and seat processes and the files under the state dir."""
    found = running_parts(state)
    found += subprocess.run(["pgrep", "-f", state["state_dir"]], capture_output=True,
                            text=True).stdout.split()
    state_dir = Path(state["state_dir"])
    found += [str(path) for path in state_dir.rglob("*")] if state_dir.exists() else []
    return found


@pytest.mark.timeout(240)
def test_a_teacher_runs_a_room_whose_qemu_seat_netboots_from_labmetal(rooms, procs, tmp_path):
    port = free_port()
    room = rooms("r62", "10.99.62.0/24", "--qemu", "1", "--light", "1", "--power", "ipmi",
                 "--port", str(port), "--api", f"http://10.99.62.2:{port}",
                 "--deploy-kernel", "deploy-kernel", "--deploy-ramdisk", "deploy-ramdisk")
    state = room.state
    assert state["settings"] == {
        "listen": f"10.99.62.2:{port}", "seat_url": f"http://10.99.62.2:{port}",
        "tftp_listen": "10.99.62.2:69", "dhcp_namespace": state["namespace"],
        "dhcp_interface": "lmt-br", "dhcp_network": "10.99.62.0/24",
        "dhcp_pool": "10.99.62.100,10.99.62.254"}
    assert "labmetal serve --listen 10.99.62.2:" in room.proc.output()
    qemu, light = room.seat("qemu"), room.seat("light")
    assert [qemu["name"], light["name"]] == ["r62-pc1", "r62-pc2"]
    assert os.stat(qemu["disk"]).st_blocks == 0  # sparse

    service = start_labmetal(procs, tmp_path, state["settings"])
    wait_for(lambda: room.proc.output().count("enrolled r62-pc") == 2, 60,
             "lab up to enroll both seats")
    hosts = tmp_path / "labmetal" / "dhcp" / "dhcp-hosts"
    wait_for(lambda: hosts.exists() and qemu["mac"] in hosts.read_text(), 30,
             "the seat's MAC in dnsmasq's hosts")

    assert ipmitool(qemu["bmc_port"], "chassis", "power", "status") == "Chassis Power is off"
    powered_on = time.monotonic()
    ipmitool(qemu["bmc_port"], "chassis", "power", "on")
    assert ipmitool(qemu["bmc_port"], "chassis", "power", "status") == "Chassis Power is on"
    # labmetal's per-MAC script for a node it knows, fetched by iPXE after /boot.ipxe
    wait_for(lambda: "node r62-pc1 is enroll: nothing to do" in room.console(qemu), 120,
             f"labmetal's boot script on the console of r62-pc1; console:\n{room.console(qemu)}")
    print(f"power-on to labmetal's boot script on the console: "
          f"{time.monotonic() - powered_on:.1f} s")
    console = room.console(qemu)
    assert "iPXE" in console and f"http://10.99.62.2:{port}/boot.ipxe" in console
    leases = (tmp_path / "labmetal" / "dhcp" / "dnsmasq.leases").read_text().split("\n")
    lease = next(line.split() for line in leases if qemu["mac"] in line)
    assert 100 <= int(lease[2].split(".")[3]) <= 254  # from labmetal's pool

    seats = status(room)
    assert seats["r62-pc1"]["power"] == "on" and seats["r62-pc2"]["power"] == "off"
    assert seats["r62-pc1"]["console"] and seats["r62-pc2"]["kind"] == "light"
    text = lab("status", "--state-dir", str(room.state_dir)).stdout
    assert "r62-pc1" in text and qemu["mac"] in text and str(qemu["bmc_port"]) in text

    ipmitool(light["bmc_port"], "chassis", "power", "on")  # the same script, over HTTP
    wait_for(lambda: "node r62-pc2 is enroll: nothing to do" in room.console(light), 60,
             f"the light seat's boot; console:\n{room.console(light)}")
    wait_for(lambda: status(room)["r62-pc2"]["power"] == "off", 30, "the light seat to stop")

    ipmitool(qemu["bmc_port"], "chassis", "power", "off")
    wait_for(lambda: ipmitool(qemu["bmc_port"], "chassis", "power", "status")
             == "Chassis Power is off", 30, "power status off")
    wait_for(lambda: status(room)["r62-pc1"]["power"] == "off", 30, "QEMU to end")
    assert not subprocess.run(["pgrep", "-f", qemu["disk"]], capture_output=True).stdout

    service.stop()
    down = lab("down", "--state-dir", str(room.state_dir))
    assert "room r62 is down" in down.stdout
    assert room.proc.popen.wait(timeout=10) == 0
    assert leftovers(state) == []


@pytest.mark.timeout(120)
def test_a_magic_packet_from_labmetals_side_wakes_a_qemu_seat(rooms):
    room = rooms("r63", "10.99.63.0/24", "--seats", "1", "--kind", "qemu", "--power", "wol")
    seat = room.seat("qemu")
    assert seat["bmc_port"] is None and status(room)[seat["name"]]["power"] == "off"
    wakeonlan.wake(seat["mac"], host="10.99.63.255", port=9, interface="10.99.63.2")
    wait_for(lambda: status(room)[seat["name"]]["power"] == "on", 30, "the seat to wake")
    wait_for(lambda: "iPXE" in room.console(seat), 60, "iPXE on the console")
    assert json.dumps({"woke": seat["mac"]}) in (room.state_dir / "wol.log").read_text()
    lab("down", "--state-dir", str(room.state_dir))
    assert leftovers(room.state) == []


@pytest.mark.timeout(180)
def test_a_crashed_room_is_cleaned_up_by_the_next_up_and_by_down(rooms, tmp_path):
    state_dir = tmp_path / "room"
    first = rooms("r64", "10.99.64.0/24", "--qemu", "1", "--light", "1", state_dir=state_dir)
    ipmitool(first.seat("qemu")["bmc_port"], "chassis", "power", "on")
    wait_for(lambda: "SeaBIOS" in first.console(first.seat("qemu")), 30, "QEMU to run")
    os.kill(first.proc.pid, signal.SIGKILL)  # `lab up` alone: its BMC process follows it
    first.proc.popen.wait(timeout=10)

    second = rooms("r64", "10.99.64.0/24", "--qemu", "1", "--light", "1", state_dir=state_dir)
    assert f"removed what the run of pid {first.state['pid']} left" in second.proc.output()
    assert running_parts(first.state) == []

    # A BMC process that dies is started again; the seats it powered are switched off.
    qemu = second.seat("qemu")
    ipmitool(qemu["bmc_port"], "chassis", "power", "on")
    wait_for(lambda: "SeaBIOS" in second.console(qemu), 30, "QEMU to run")
    os.kill(second.state["processes"]["bmc"][0], signal.SIGKILL)
    second.proc.wait_for_output("switching the seats off and starting it again", 30)
    wait_for(lambda: status(second)[qemu["name"]]["power"] == "off", 30, "the seat to be off")
    state = json.loads((state_dir / STATE_FILE).read_text())
    bmc_pid = state["processes"]["bmc"][0]
    assert bmc_pid != second.state["processes"]["bmc"][0]
    assert ipmitool(qemu["bmc_port"], "chassis", "power", "status") == "Chassis Power is off"

    # The whole of it killed at once (as by the OOM killer): QEMU outlives its BMC.
    ipmitool(qemu["bmc_port"], "chassis", "power", "on")
    wait_for(lambda: status(second)[qemu["name"]]["power"] == "on", 30, "QEMU to run")
    os.kill(second.proc.pid, signal.SIGKILL)
    os.kill(bmc_pid, signal.SIGKILL)
    second.proc.popen.wait(timeout=10)
    wait_for(lambda: not Path(f"/proc/{bmc_pid}").exists(), 10, "the BMC process to end")
    assert subprocess.run(["pgrep", "-f", qemu["disk"]], capture_output=True).stdout
    down = lab("down", "--state-dir", str(state_dir))
    assert "removed what the run of pid" in down.stdout
    assert leftovers(state) == []
    assert lab("down", "--state-dir", str(state_dir), check=False).returncode == 2
