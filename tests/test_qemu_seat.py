"""A QEMU seat is a PC a virtual BMC can drive: power on starts QEMU (SeaBIOS, then iPXE
from the NIC's option ROM) on a tap in the room, reset stays in the same QEMU unless the
boot device changed, power off (or the guest ending QEMU) is off. Seats files hold both
kinds, and older light-only files still load."""
from __future__ import annotations

import json
import os
import subprocess
from dataclasses import asdict
from pathlib import Path

import pytest

from labmetal.lab.network import Lab
from labmetal.lab.qemu_seat import QemuSeat, QemuSeatSpec
from labmetal.lab.seat import LightSeat, LightSeatSpec, load_seats, make_seat, save_seats
from labmetal.lab.harness import wait_for

MAC = "52:54:00:3d:3e:01"
# A bound on a hang, not an expected time: TCG on a machine whose cores other jobs share
# takes minutes where an idle one takes seconds (each wait returns as soon as it holds).
HANG = 300


def test_seats_files_hold_both_kinds_and_old_files_are_light_seats(tmp_path):
    light = LightSeatSpec("pc1", "lmt-1-r1-s1", "52:54:00:00:00:01", "/d1", "http://h:1", "/s1",
                          bmc_port=1001)
    qemu = QemuSeatSpec("pc2", "lmt-1-r1", "lmt-q2", "52:54:00:00:00:02", "/d2", "/s2",
                        bmc_port=1002)
    old = tmp_path / "old.json"
    LightSeatSpec.save_all(old, [light])
    assert "kind" not in old.read_text() and load_seats(old) == [light]

    mixed = tmp_path / "mixed.json"
    save_seats(mixed, [light, qemu])
    assert [entry["kind"] for entry in json.loads(mixed.read_text())] == ["light", "qemu"]
    assert load_seats(mixed) == [light, qemu]
    assert qemu.memory_mib == 1024
    seats = [make_seat(spec) for spec in load_seats(mixed)]
    assert isinstance(seats[0], LightSeat) and isinstance(seats[1], QemuSeat)

    mixed.write_text(json.dumps([{"kind": "vm", **asdict(qemu)}]))
    with pytest.raises(ValueError, match="unknown seat kind 'vm'"):
        load_seats(mixed)


def console_count(seat: QemuSeat, text: str) -> int:
    return seat.console_log.read_text(errors="replace").count(text) \
        if seat.console_log.exists() else 0


def qemu_argv(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


@pytest.mark.timeout(120)
def test_a_bmc_powers_a_qemu_seat_resets_it_and_switches_it_off(tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"")
    os.truncate(disk, 64 * 2**20)
    seat = None
    with Lab() as lab:
        room = lab.add_room("r61", server="10.99.61.1/24")
        tap = lab.add_tap(room, "q1", rate="100mbit")
        spec = QemuSeatSpec("pc61-1", room.namespace, tap, MAC, str(disk),
                            str(tmp_path / "deep" / "enough" / "for" / "a" / "socket" / "path" /
                                "to" / "be" / "too" / "long" / "pc61-1"))
        seat = QemuSeat(spec)
        try:
            assert not seat.is_on() and seat.get_boot_device() == "network"
            seat.power_on()
            wait_for(seat.is_on, HANG, "QEMU to start")
            first = seat.pid
            assert first is not None and "order=nc" in qemu_argv(first)
            wait_for(lambda: console_count(seat, "iPXE") > 0, HANG, "iPXE on the serial console")

            seat.reset()  # same boot device: a reset inside the same QEMU
            wait_for(lambda: console_count(seat, "SeaBIOS") == 2, HANG, "SeaBIOS after reset")
            assert seat.pid == first

            seat.set_boot_device("hd")  # takes effect at the reset: a new QEMU
            seat.reset()
            wait_for(lambda: seat.pid not in (None, first), HANG, "a new QEMU")
            assert "order=c" in qemu_argv(seat.pid)
            wait_for(lambda: console_count(seat, "Booting from Hard Disk") > 0, HANG,
                     "the disk boot")
            assert "console.log" in os.listdir(spec.state_dir)

            # The guest switching itself off ends QEMU, like a PC: the seat is off.
            second = seat.pid
            subprocess.run(["ip", "netns", "exec", room.namespace, "kill", str(second)],
                           check=True)
            wait_for(lambda: not seat.is_on(), HANG, "the seat to be off")

            seat.set_boot_device("pxe")
            seat.power_on()
            wait_for(seat.is_on, HANG, "QEMU to start again")
            third = seat.pid
            assert "order=nc" in qemu_argv(third)
            # the third boot's banner, before it is switched off (a loaded machine is slow)
            wait_for(lambda: console_count(seat, "SeaBIOS") == 4, HANG, "SeaBIOS, third boot")
            seat.power_off()  # QMP quit
            wait_for(lambda: not seat.is_on() and not Path(f"/proc/{third}").exists(), HANG,
                     "QEMU to quit")
            assert console_count(seat, "SeaBIOS") == 4  # the log is appended across boots
        finally:
            seat.shutdown()
    assert not Path(f"/proc/{first}").exists()
