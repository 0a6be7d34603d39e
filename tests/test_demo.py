"""The main job: `labmetal demo` provisions a simulated room end to end (real PXE boots of
QEMU seats, light seats, the real deploy ramdisk) as a teacher does it (a room, a room job
over multicast), then stops (--once); and stopping it removes everything, however it is
stopped."""
import json
import os
import re
import select
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from labmetal.lab.network import namespaces, remove_namespace
from labmetal.lab.room import STATE_FILE, start_time
from labmetal.lab.harness import LABMETAL, free_port, wait_for

pytestmark = pytest.mark.ramdisk


def test_demo_deploys_every_seat_and_the_qemu_seat_boots_the_os(tmp_path):
    result = subprocess.run([LABMETAL, "demo", "--qemu", "1", "--light", "1", "--once",
                             "--subnet", "10.99.201.0/24", "--port", str(free_port()),
                             "--state-dir", str(tmp_path / "demo")],
                            capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "2/2 seats deployed in" in result.stdout
    assert "(room job done, multicast)" in result.stdout, result.stdout
    assert re.search(r"A01  demo-pc1   qemu  done +\[#+\] 100%", result.stdout), result.stdout
    assert re.search(r"The room's page: http://10\.99\.201\.2:\d+/ui/rooms/demo", result.stdout)
    assert re.search(r"demo-pc1 \(QEMU\) booted the deployed OS: labmetal-os: image=demo-os "
                     r"mac=52:54:00:63:c9:01 booted", result.stdout), result.stdout
    assert "room demo is down" in (tmp_path / "demo" / "room.log").read_text()


# -- stopping the demo removes everything, however it is stopped -----------------------------
#
# Each run is a small light-seat room on its own subnet; the demo is started in its own
# session, so each signal reaches the demo alone (as a supervisor or a script sends it), not
# the children it started. Its stdout is a pipe that the test reads, and may close (a `tee`
# that died).

STOP_TIMEOUT = 300  # lab up waits up to 45 s per child, on 2 loaded cores
START_TIMEOUT = 300


class DemoRun:
    """`labmetal demo --qemu 0 --light 2` on ``subnet``, started in its own session."""

    def __init__(self, tmp_path: Path, subnet: str, port: int):
        self.state_dir = tmp_path / "demo"
        self.room_dir = self.state_dir / "room"
        self.stderr = tmp_path / "demo.stderr"
        self.text = ""
        self.lock = threading.Lock()
        self.closing = threading.Event()
        read_end, write_end = os.pipe()
        with open(self.stderr, "wb") as stderr:
            self.popen = subprocess.Popen(
                [LABMETAL, "demo", "--qemu", "0", "--light", "2", "--subnet", subnet,
                 "--port", str(port), "--state-dir", str(self.state_dir)],
                stdin=subprocess.DEVNULL, stdout=write_end, stderr=stderr,
                start_new_session=True)
        os.close(write_end)
        self.read_end: int | None = read_end
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.room: dict = {}

    def _read(self) -> None:
        while not self.closing.is_set():
            if not select.select([self.read_end], [], [], 0.2)[0]:
                continue
            chunk = os.read(self.read_end, 65536)
            if not chunk:
                return
            with self.lock:
                self.text += chunk.decode(errors="replace")

    def output(self) -> str:
        with self.lock:
            return self.text

    def logs(self) -> str:
        parts = [f"--- stdout\n{self.output()[-3000:]}"]
        for path in (self.stderr, self.state_dir / "room.log", self.state_dir / "service.log"):
            if path.exists():
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    def wait_for_line(self, text: str, timeout: float = START_TIMEOUT) -> None:
        def seen() -> bool:
            if self.popen.poll() is not None:
                raise AssertionError(f"the demo exited ({self.popen.returncode}) before "
                                     f"{text!r}:\n{self.logs()}")
            return text in self.output()
        wait_for(seen, timeout, f"{text!r} from the demo", interval=0.2)

    def wait_for_room(self) -> dict:
        """The room's state file once `lab up` has built it and started its BMCs."""
        def built() -> dict | None:
            path = self.room_dir / STATE_FILE
            try:
                state = json.loads(path.read_text()) if path.exists() else None
            except ValueError:  # being replaced
                return None
            return state if state and state["seats"] and state["processes"] else None
        self.room = wait_for(built, START_TIMEOUT, "the room's state file", interval=0.2)
        return self.room

    def close_output(self) -> None:
        """As a `tee` that dies: nobody reads the demo's stdout any more."""
        self.closing.set()
        self.reader.join(timeout=10)
        if self.read_end is not None:
            os.close(self.read_end)
            self.read_end = None

    def started(self) -> dict[int, int]:
        """pid: start time of every process the demo started (its descendants, and any
        process naming its state dir), the demo's own excluded."""
        found = _descendants(self.popen.pid) | _naming(str(self.state_dir))
        found.discard(self.popen.pid)
        return {pid: start for pid in found if (start := start_time(pid))}

    def lab_up_namespaces(self) -> list[str]:
        """The network namespaces of this room: recorded, and named after `lab up`'s PID."""
        prefix = f"lmt-{self.room['pid']}-"
        return sorted(set(self.room["namespaces"]) & set(namespaces())
                      | {name for name in namespaces() if name.startswith(prefix)})

    def clean_up(self) -> None:
        """Whatever the test or a broken demo left: the demo, `lab down`, the processes
        naming the state dir, the room's namespaces."""
        self.close_output()
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=30)
        if (self.room_dir / STATE_FILE).exists():
            subprocess.run([LABMETAL, "lab", "down", "--state-dir", str(self.room_dir)],
                           capture_output=True, timeout=180)
        for pid in _naming(str(self.state_dir)):
            _kill(pid)
        if self.room:
            for name in self.lab_up_namespaces():
                remove_namespace(name)
            subprocess.run(["ip", "link", "del", self.room["uplink"]], capture_output=True,
                           timeout=30)


def _pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def _descendants(root: int) -> set[int]:
    parents = {}
    for pid in _pids():
        try:
            parents[pid] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    found, grew = {root}, True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in found} - found
        found |= more
        grew = bool(more)
    return found


def _naming(text: str) -> set[int]:
    """Live processes whose command line or environment holds ``text``, but this one."""
    wanted = text.encode()
    found = set()
    for pid in _pids():
        if pid == os.getpid():
            continue
        try:
            if any(wanted in Path(f"/proc/{pid}/{part}").read_bytes()
                   for part in ("cmdline", "environ")) and start_time(pid):
                found.add(pid)
        except OSError:
            continue
    return found


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def assert_everything_removed(demo: DemoRun, started: dict[int, int]) -> None:
    """Nothing the demo started still runs, its room's namespaces and uplink are gone."""
    def left() -> list[str]:
        running = [pid for pid, start in started.items() if start_time(pid) == start]
        running += sorted(_naming(str(demo.state_dir)) - set(running))
        described = []
        for pid in running:
            try:
                described.append(f"{pid}: " + Path(f"/proc/{pid}/cmdline").read_bytes()
                                 .replace(b"\0", b" ").decode(errors="replace")[:200])
            except OSError:
                continue
        return described + demo.lab_up_namespaces()
    try:
        wait_for(lambda: not left(), 180, "the demo's processes and namespaces to be gone",
                 interval=0.5)
    except AssertionError:
        raise AssertionError(f"left running: {left()}\n{demo.logs()}") from None
    uplink = subprocess.run(["ip", "link", "show", "dev", demo.room["uplink"]],
                            capture_output=True, timeout=30)
    assert uplink.returncode != 0, f"the uplink {demo.room['uplink']} is still there"
    assert not (demo.room_dir / STATE_FILE).exists()


def test_sigterm_to_the_demo_alone_stops_the_room_and_the_service(tmp_path):
    demo = DemoRun(tmp_path, "10.99.231.0/24", 6431)
    try:
        demo.wait_for_line("labmetal is running at http://10.99.231.2:6431")
        demo.wait_for_room()
        started = demo.started()
        assert len(started) >= 4, started  # lab up, its BMCs, 2 agents, serve, dnsmasq
        assert demo.lab_up_namespaces()
        began = time.monotonic()
        demo.popen.send_signal(signal.SIGTERM)
        assert demo.popen.wait(timeout=STOP_TIMEOUT) == 128 + signal.SIGTERM, demo.logs()
        assert_everything_removed(demo, started)
        print(f"stopped and cleaned up in {time.monotonic() - began:.1f} s")
        assert "stopping the service and the room" in demo.output()
    finally:
        demo.clean_up()


def test_sigint_after_its_output_pipe_closed_still_removes_everything(tmp_path):
    """`labmetal demo | tee log`, then tee dies: the demo's prints fail (EPIPE); a SIGINT
    then must still remove everything."""
    demo = DemoRun(tmp_path, "10.99.232.0/24", 6432)
    try:
        demo.wait_for_line("labmetal is running at http://10.99.232.2:6432")
        demo.wait_for_room()
        demo.wait_for_line("deploying")  # the room job runs, and its progress is printed
        started = demo.started()
        demo.close_output()
        demo.popen.send_signal(signal.SIGINT)
        assert demo.popen.wait(timeout=STOP_TIMEOUT) == 128 + signal.SIGINT, demo.logs()
        assert_everything_removed(demo, started)
        assert "Traceback" not in demo.stderr.read_text(errors="replace"), demo.logs()
    finally:
        demo.clean_up()


def test_a_demo_killed_with_sigkill_takes_its_children_with_it(tmp_path):
    """No handler runs on SIGKILL: the children themselves ask the kernel for a SIGTERM when
    the demo dies (PR_SET_PDEATHSIG), and `lab up` then removes the room."""
    demo = DemoRun(tmp_path, "10.99.233.0/24", 6433)
    try:
        demo.wait_for_line("labmetal is running at http://10.99.233.2:6433")
        demo.wait_for_room()
        started = demo.started()
        demo.popen.kill()
        demo.popen.wait(timeout=30)
        assert_everything_removed(demo, started)
    finally:
        demo.clean_up()
