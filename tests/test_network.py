"""The simulated lab's network: rooms and seats in namespaces, shaped links, and cleanup."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from labmetal.lab.network import Lab, in_namespace, namespaces, remove_leftovers, run_in

# Receives until the sender closes; prints the byte count and the seconds it took.
RECEIVER = ("import socket, time; s = socket.create_server(('0.0.0.0', 9000)); "
            "c = s.accept()[0]; t = time.monotonic(); n = 0\n"
            "while (b := c.recv(65536)): n += len(b)\nprint(n, time.monotonic() - t)")
SENDER = ("import socket, sys; c = socket.create_connection((sys.argv[1], 9000), 10); "
          "c.sendall(bytes(int(sys.argv[2]))); c.close()")


def send_seconds(from_namespace: str, to_namespace: str, address: str, size: int) -> float:
    """Seconds ``size`` bytes take over TCP from one namespace to another."""
    receiver = subprocess.Popen(in_namespace(to_namespace, [sys.executable, "-c", RECEIVER]),
                                stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while "9000" not in run_in(to_namespace, ["ss", "-ltn"]).stdout:
            assert time.monotonic() < deadline, "the receiver did not listen"
            time.sleep(0.05)
        run_in(from_namespace, [sys.executable, "-c", SENDER, address, str(size)])
        received, seconds = receiver.communicate(timeout=30)[0].split()
        assert int(received) == size
        return float(seconds)
    finally:
        receiver.kill()
        receiver.wait()


def test_a_room_connects_its_seats_to_the_server_side_and_nothing_else():
    with Lab() as lab:
        room = lab.add_room("r1", "10.99.2.1/24")
        a01 = lab.add_seat(room, "a01", "52:54:00:00:03:01", address="10.99.2.11/24")
        a02 = lab.add_seat(room, "a02", "52:54:00:00:03:02", address="10.99.2.12/24")
        assert run_in(a01.namespace, ["busybox", "ping", "-c", "1", "-W", "5",
                                      room.server_ip]).returncode == 0
        assert run_in(a01.namespace, ["busybox", "ping", "-c", "1", "-W", "5",
                                      "10.99.2.12"]).returncode == 0
        assert "52:54:00:00:03:02" in run_in(a02.namespace, ["ip", "link", "show",
                                                              a02.interface]).stdout
        bridge = run_in(room.namespace, ["ip", "-o", "link", "show", "master", room.bridge]).stdout
        assert "lmt-a01" in bridge and "lmt-a02" in bridge
        assert set(lab.made) <= set(namespaces())
        # the host's own network is not part of it
        assert "eth0" not in run_in(room.namespace, ["ip", "-o", "link"]).stdout
    assert not set(lab.made) & set(namespaces())


def test_a_shaped_seat_link_carries_its_rate():
    with Lab() as lab:
        room = lab.add_room("r1", "10.99.2.1/24")
        slow = lab.add_seat(room, "a01", "52:54:00:00:03:01", address="10.99.2.11/24",
                            rate="8mbit")
        fast = lab.add_seat(room, "a02", "52:54:00:00:03:02", address="10.99.2.12/24")
        assert "rate 8Mbit" in subprocess.run(["tc", "-n", room.namespace, "class", "show", "dev",
                                               slow.switch_port], capture_output=True,
                                              text=True).stdout
        megabyte = 1_000_000
        slow_seconds = send_seconds(room.namespace, slow.namespace, "10.99.2.11", megabyte)
        fast_seconds = send_seconds(room.namespace, fast.namespace, "10.99.2.12", megabyte)
        assert slow_seconds > 0.7  # 8 Mbit/s: 1 MB takes ~1 s
        assert fast_seconds < slow_seconds / 4


def test_everything_is_removed_even_when_the_test_fails_and_leftovers_of_a_crash_later():
    with pytest.raises(RuntimeError):
        with Lab() as lab:
            room = lab.add_room("r1", "10.99.2.1/24")
            lab.add_seat(room, "a01", "52:54:00:00:03:01")
            sleeper = subprocess.Popen(in_namespace(room.namespace, ["sleep", "600"]))
            raise RuntimeError("the test failed here")
    assert sleeper.wait(timeout=10) != 0  # what ran inside was stopped too
    assert not set(lab.made) & set(namespaces())

    dead = subprocess.Popen(["true"])
    dead.wait()
    crashed = Lab(owner=dead.pid)  # as if made by a run that crashed
    crashed.add_room("r9", "10.99.9.1/24")
    with Lab() as live:
        live.add_room("r1", "10.99.2.1/24")
        removed = remove_leftovers()
        assert set(crashed.made) <= set(removed)
        assert set(live.made) <= set(namespaces())
    assert not (set(crashed.made) | set(live.made)) & set(namespaces())


def test_names_that_do_not_fit_an_interface_are_refused():
    with Lab() as lab:
        with pytest.raises(ValueError):
            lab.add_room("a-very-long-room-name", "10.99.2.1/24")
        room = lab.add_room("r1", "10.99.2.1/24")
        with pytest.raises(ValueError):
            lab.add_seat(room, "a01", "52:54:00:00:03")
        with pytest.raises(ValueError):
            lab.add_seat(room, "A 01", "52:54:00:00:03:01")
