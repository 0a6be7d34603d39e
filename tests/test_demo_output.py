"""The demo's parts that need no room (fast): its live view of a room job, its output once
the pipe it writes to is gone, and the stop signals it handles from its first line."""
from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from labmetal.lab import demo
from labmetal.lab.demo import Output, RoomView, StopSignals, Stopped

SEATS = {"A01": {"name": "demo-pc1", "kind": "qemu"}, "A02": {"name": "demo-pc2",
                                                             "kind": "light"}}


class Captured(Output):
    def __init__(self) -> None:
        super().__init__()
        self.text = ""

    @property
    def tty(self) -> bool:
        return False

    def write(self, text: str) -> None:
        self.text += text


def grid(job_state: str, *seats: tuple[str, str, int], uuid: str = "job-1") -> dict:
    """A `GET /v1/rooms/<room>` answer, reduced to what the view reads."""
    counts: dict[str, int] = {}
    for _, state, _ in seats:
        counts[state] = counts.get(state, 0) + 1
    return {"job": {"uuid": uuid, "state": job_state, "chosen_transport": "multicast",
                    "counts": counts},
            "seats": [{"label": label, "node_name": SEATS[label]["name"], "node_uuid": "u",
                       "state": state, "progress": progress, "attempts": 1, "error": None}
                      for label, state, progress in seats]}


def test_the_room_view_prints_each_seat_as_it_changes_until_the_job_ends():
    out = Captured()
    view = RoomView(SEATS, "job-1", out)
    assert view.show({"job": None, "seats": []}) is None  # scheduled: not running yet
    assert "waiting for the conductor" in out.text
    assert view.show(grid("running", ("A01", "booting", 0), ("A02", "writing", 50))) is None
    assert "  A02  demo-pc2   light writing    [############            ]  50%\n" in out.text
    out.text = ""
    assert view.show(grid("running", ("A01", "booting", 0), ("A02", "done", 100))) is None
    assert out.text == ("  room job running via multicast: 1 booting, 1 done\n"
                        "  A02  demo-pc2   light done       [########################] 100%\n")
    finished = grid("done", ("A01", "done", 100), ("A02", "done", 100))
    assert view.show(finished) is finished
    # an older job of the room that has finished is not ours
    assert RoomView(SEATS, "job-2", Captured()).show(finished) is None


def test_output_goes_quiet_when_nobody_reads_it_any_more(monkeypatch):
    """`labmetal demo | tee log` and tee is gone: no BrokenPipeError, now or at exit."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    pipe = os.fdopen(write_end, "w")
    monkeypatch.setattr(sys, "stdout", pipe)
    out = Output()
    out.write("stopping the service and the room\n")  # EPIPE, caught
    assert out.gone and not out.tty
    out.write("more\n")
    pipe.write("what the interpreter flushes at exit\n")
    pipe.flush()  # the descriptor is /dev/null's now
    assert os.fstat(write_end).st_rdev == os.stat(os.devnull).st_rdev
    pipe.close()


@pytest.fixture
def handlers():
    saved = {signum: signal.getsignal(signum) for signum in demo.STOP_SIGNALS}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_a_stop_signal_raises_once_and_waits_for_the_child_being_started(handlers):
    signals = StopSignals()
    signals.install()
    reached = False
    with pytest.raises(Stopped) as stopped:
        with signals.holding():  # a child is being started and recorded
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            reached = True
    assert reached and stopped.value.signum == signal.SIGTERM
    os.kill(os.getpid(), signal.SIGINT)  # once stopping, more signals are only noted
    time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGHUP)
    time.sleep(0.2)


def test_a_signal_before_anything_started_stops_at_once(handlers):
    StopSignals().install()
    with pytest.raises(Stopped) as stopped:
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(5)
    assert stopped.value.signum == signal.SIGHUP


def test_multicast_runs_just_below_a_seat_link():
    assert demo._multicast_rate("100mbit") == 90_000_000
    assert demo._multicast_rate("1gbit") == 900_000_000
    assert demo._multicast_rate("off") is None
