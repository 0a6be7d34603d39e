"""Benchmark: students' session disks (issue 7), the ``local`` store (qcow2 overlay +
qemu-storage-daemon + tgtd) and the ``ceph`` store (RBD clone on a single-node Ceph that the
bench starts and stops, served by tgtd's rbd backing store), each through a real labmetal
service on loopback, with seats as iSCSI initiators in userspace (libiscsi, the seat's
initiator name and its session's CHAP account, as tests/test_sessions.py does).

The template is a raw disk of ``--template-mib`` (an msdos label and an ext4 file system
about 70 % full of files from /usr: real data, not zeros), uploaded through the API and
made a template. For each store, in one run:

1. Start latency: ``POST /v1/sessions/<id>/start {"seat"}``, which returns once the seat's
   target is exported; each start is then confirmed by the seat logging in and reading
   64 KiB of LUN 1 (the time of that login + read is the baseline), and the session
   stopped again. Median and p90 of ``--starts`` starts, after one unmeasured start (the
   store's first, which starts tgtd).
2. ``--seats`` seats reading their own sessions at once: one session per student, each
   started on its own seat, each read whole over iSCSI by one ``qemu-img convert`` to a
   null target (8 reads of 2 MiB in flight). Aggregate MiB/s (all bytes ÷ the time until
   the last reader is done), against the same tool reading the template's raw file
   locally, as many readers at once, in the same run; and one seat alone against one
   local reader. First, one seat's disk is compared with the template (``qemu-img
   compare`` over iSCSI: the seat reads exactly the template), and the template files are
   read (warm page cache for both; Ceph's memstore keeps its data in RAM anyway). The CPU
   time each kind of process used while the seats read says what the 2 cores went to.
3. Storage cost of a student's changes: 50 MiB of random data written over iSCSI as a
   seat would (``qemu-io write -s``): at once (one extent), and spread (800 writes of
   64 KiB, evenly over the disk); then the session stopped (flushed). What the store
   reports (``used_bytes``) and what is measured without it (the overlay file's ``du``
   and the bytes ``qemu-img map`` shows in the overlay itself; ``rbd du``), ÷ 50 MiB.

    nice -n 10 .venv/bin/python -m bench.sessions [--backend local|ceph|both] [--seats 20]
        [--template-mib 1024] [--starts 10] [--ceph-object-order N]

``--ceph-object-order`` sets the service's ``ceph_object_order`` (its sessions' clones have
2**N-byte objects; default: the service's).

Runs as root (tgtd, FUSE, Ceph). Everything it starts (service, tgtd, qemu-storage-daemon,
Ceph, readers) is stopped, and its files removed, on every way out, Ctrl-C included.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import sqlite3
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from bench.deploy import make_image
from labmetal.names import seat_iqn
from labmetal.db import Database
from labmetal.secrets import SecretBox
from labmetal.users import set_user
from labmetal.lab.ceph import CephCluster, missing_tools
from labmetal.lab.iscsi_seat import IscsiSeat
from labmetal.lab.harness import Processes, Service, error_text, free_port, start_service

MIB = 1024 * 1024
DEPTH = 8  # a reader's requests in flight (qemu-img convert's coroutines, 2 MiB each)
WRITTEN = 50 * MIB
SPREAD_WRITES = 800  # 800 x 64 KiB = 50 MiB
FILL_FROM = Path("/usr")
FILL_SHARE = 0.7  # of the template's file system
TEMPLATE = "tp-bench"
CORES = os.cpu_count() or 1
TICK = os.sysconf("SC_CLK_TCK")


# -- the template image ------------------------------------------------------------------
def fill_tree(work: Path, budget: int) -> Path:
    """A tree of up to ``budget`` bytes of /usr's files (hard links: nothing is copied)."""
    tree = work / "fill"
    used = 0
    for top, dirs, files in os.walk(FILL_FROM):
        dirs.sort()
        for name in sorted(files):
            source = Path(top, name)
            if source.is_symlink() or not source.is_file():
                continue
            size = source.stat().st_size
            if used + size > budget:
                return tree
            target = tree / source.relative_to(FILL_FROM)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, target)
            except OSError:  # another file system
                shutil.copyfile(source, target)
            used += size
    return tree


def template_image(work: Path, size_mib: int) -> Path:
    tree = fill_tree(work, int(size_mib * MIB * FILL_SHARE))
    try:
        return make_image(work, size_mib, tree)
    finally:
        shutil.rmtree(tree, ignore_errors=True)


def warm(path: Path) -> None:
    with open(path, "rb") as image:
        while image.read(8 * MIB):
            pass


# -- the store under test: a service, its seats and students -----------------------------
@dataclass
class Store:
    backend: str
    service: Service
    run_dir: Path
    seats: list[str]  # node UUIDs
    ceph: CephCluster | None = None
    template_key: str = ""  # the template's name in the store
    students: int = 0

    def api(self, method: str, path: str, body: Any = None, status: int = 200,
            **kwargs: Any) -> Any:
        response = requests.request(method, self.service.url + path, json=body,
                                    timeout=900, **kwargs)
        if response.status_code != status:
            raise SystemExit(f"{method} {path}: {response.status_code} "
                             f"{error_text(response) if response.content else ''}")
        return response.json() if response.content else None

    def new_session(self) -> str:
        self.students += 1
        return self.api("POST", "/v1/sessions", {"template": TEMPLATE,
                                                 "student": f"st{self.students:03d}"},
                        status=201)["uuid"]

    def start(self, session: str, seat: int) -> tuple[float, IscsiSeat]:
        """Seconds the start call took, and the seat that may now read the session."""
        started = time.perf_counter()
        view = self.api("POST", f"/v1/sessions/{session}/start", {"seat": self.seats[seat]})
        seconds = time.perf_counter() - started
        return seconds, self.seat(view, seat)

    def stop(self, session: str) -> dict[str, Any]:
        return self.api("POST", f"/v1/sessions/{session}/stop")

    def seat(self, view: dict[str, Any], seat: int) -> IscsiSeat:
        """What the seat's boot script is given: the target and the session's CHAP account
        (from the database, unsealed with the service's key: the API never returns it)."""
        state_dir = self.service.state_dir
        with contextlib.closing(sqlite3.connect(state_dir / "labmetal.db")) as db:
            user, sealed = db.execute("SELECT chap_user, chap_secret FROM student_sessions "
                                      "WHERE uuid = ?", (view["uuid"],)).fetchone()
        secret_file = self.run_dir / f"chap-{view['uuid']}"
        secret_file.write_text(SecretBox.from_file(state_dir / "secret.key").open(sealed))
        target = view["target"]
        return IscsiSeat(seat_iqn(self.seats[seat]), target["portal"], target["iqn"], user,
                         secret_file)

    def overlay(self, session: str) -> Path:
        return self.service.state_dir / "overlays" / "sessions" / session / "overlay.qcow2"

    def template_file(self) -> Path:
        return self.service.state_dir / "overlays" / "templates" / self.template_key / \
            "v1.raw"

    def daemons(self) -> dict[int, str]:
        """PID -> kind of the processes serving this store's sessions."""
        found = processes_of(self.run_dir)
        if self.ceph is not None:
            found.update({pid: "ceph-mon" if "ceph-mon" in cmdline(pid) else "ceph-osd"
                          for pid in self.ceph.pids})
        found[self.service.proc.pid] = "labmetal"
        return found


def open_store(backend: str, procs: Processes, work: Path, image: Path, seats: int,
               ceph: CephCluster | None, stack: contextlib.ExitStack,
               object_order: int | None = None) -> Store:
    state_dir = work / f"{backend}-state"
    db = Database(f"sqlite:///{state_dir / 'labmetal.db'}")
    db.upgrade()
    for number in range(1, seats + 3 + 1):  # the readers, the start one, two writers
        set_user(db, f"st{number:03d}", None, "student", source="ldap")
    db.dispose()
    run_dir = Path(tempfile.mkdtemp(prefix="lm-bs-"))  # short: unix socket paths
    stack.callback(stop_serving, procs, run_dir)  # before Ceph: tgtd has its images open
    settings: dict[str, Any] = {}
    if ceph is not None:
        settings = {"ceph_conf": ceph.conf_path, "ceph_pool": ceph.pool, "ceph_timeout": 10}
        if object_order is not None:
            settings["ceph_object_order"] = object_order
    service = start_service(procs, f"bench-{backend}", state_dir=state_dir,
                            overlay_backend=backend, overlay_run_dir=run_dir,
                            iscsi_portal=f"127.0.0.1:{free_port()}", **settings)
    store = Store(backend, service, run_dir, [], ceph)
    store.api("POST", "/v1/images", {"name": "tp", "kind": "whole-disk",
                                     "disk_format": "raw"}, status=201)
    with open(image, "rb") as data:
        store.api("PUT", "/v1/images/tp/data", data=data)
    template = store.api("POST", "/v1/templates", {"name": TEMPLATE, "image": "tp"},
                         status=201)
    store.template_key = template["versions"][0]["backend_key"]
    for number in range(1, seats + 1):
        store.seats.append(store.api("POST", "/v1/nodes", {"name": f"seat{number:03d}",
                                                           "driver": "wol"},
                                     status=201)["uuid"])
    return store


def stop_serving(procs: Processes, run_dir: Path) -> None:
    """The service stops its tgtd and qemu-storage-daemons; whatever it left is killed."""
    procs.stop_all()
    for pid in processes_of(run_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            print(f"  (killed pid {pid}, left behind by the service)")
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        if str(run_dir) in line.split()[4]:
            subprocess.run(["umount", "-l", line.split()[4]], check=False,
                           capture_output=True)
    shutil.rmtree(run_dir, ignore_errors=True)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def processes_of(run_dir: Path) -> dict[int, str]:
    """PID -> kind of the tgtd (found by its TGT_IPC_SOCKET) and qemu-storage-daemons
    serving from ``run_dir``."""
    found = {}
    mark = str(run_dir).encode()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            command = (proc / "cmdline").read_bytes()
            kind = next((k for k in ("tgtd", "qemu-storage-daemon")
                         if command.startswith(k.encode())), None)
            if kind is None:
                continue
            environ = (proc / "environ").read_bytes() if kind == "tgtd" else b""
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X") and mark in command + environ:
            found[int(proc.name)] = kind
    return found


# -- iSCSI seats in userspace ------------------------------------------------------------
def iscsi_opts(seat: IscsiSeat) -> str:
    return ",".join(["driver=iscsi", "transport=tcp", f"portal={seat.portal}",
                     f"target={seat.iqn}", f"lun={seat.lun}", f"user={seat.chap_user}",
                     "password-secret=chap", f"initiator-name={seat.initiator}"])


def secret_object(seat: IscsiSeat) -> list[str]:
    return ["--object", f"secret,id=chap,file={seat.secret_file}"]


def reader(source: list[str], size: int) -> list[str]:
    """``qemu-img convert`` of the whole disk to a null target: every byte is read (the
    iSCSI LUN says it is all data; the local image is allocated), nothing is written."""
    return ["qemu-img", "convert", *source, "-n", "-m", str(DEPTH), "-W",
            "--target-image-opts", f"driver=null-co,size={size}"]


def iscsi_reader(seat: IscsiSeat, size: int) -> list[str]:
    return reader([*secret_object(seat), "--image-opts", iscsi_opts(seat)], size)


def local_reader(path: Path, size: int) -> list[str]:
    return reader(["-f", "raw", str(path)], size)


def write_random(seat: IscsiSeat, source: Path, extents: list[tuple[int, int]]) -> None:
    """Write the first bytes of ``source`` at each (offset, length), then close (flush)."""
    commands = [arg for offset, length in extents
                for arg in ("-c", f"write -q -s {source} {offset} {length}")]
    done = subprocess.run(["qemu-io", *secret_object(seat), "--image-opts", iscsi_opts(seat),
                           *commands], check=False, capture_output=True, text=True,
                          timeout=600)
    if done.returncode != 0 or done.stderr.strip():
        raise SystemExit(f"writing over iSCSI failed: {done.stdout[-500:]}{done.stderr}")


# -- CPU accounting ----------------------------------------------------------------------
class CpuWindow:
    """The CPU time spent from now until ``close()``: by the whole machine, by this
    process's children (the readers) and by each kind of daemon."""

    def __init__(self, daemons: dict[int, str]):
        self.daemons = daemons
        self.started = time.perf_counter()
        self.machine = machine_ticks()
        self.children = children_cpu()
        self.per_pid = {pid: process_cpu(pid) for pid in daemons}

    def close(self, readers: str) -> tuple[float, float, dict[str, float]]:
        """(wall seconds, the machine's busy share of all its cores, CPU seconds by kind)."""
        wall = time.perf_counter() - self.started
        busy, total = (after - before for after, before in zip(machine_ticks(), self.machine))
        spent = {readers: children_cpu() - self.children}
        for pid, kind in self.daemons.items():
            spent[kind] = spent.get(kind, 0.0) + process_cpu(pid) - self.per_pid[pid]
        return wall, busy / total if total else 0.0, spent


def process_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all cores; iowait counts as idle (guest time is already
    in user time)."""
    line = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    values = [int(v) for v in line[1:9]]  # user nice system idle iowait irq softirq steal
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def cpu_verdict(wall: float, busy: float, spent: dict[str, float]) -> str:
    cores = {kind: seconds / wall for kind, seconds in spent.items()}
    cores["the rest (kernel: loopback TCP, FUSE; other processes)"] = \
        busy * CORES - sum(cores.values())
    shares = ", ".join(f"{kind} {used:.2f}" for kind, used in
                       sorted(cores.items(), key=lambda item: -item[1]) if used >= 0.05)
    verdict = "CPU-bound" if busy >= 0.9 else \
        f"not CPU-bound ({(1 - busy) * CORES:.2f} of {CORES} cores idle)"
    return f"machine {busy * 100:.0f} % busy: {verdict}; cores used: {shares}"


# -- the measures ------------------------------------------------------------------------
def run_readers(argvs: list[list[str]]) -> float:
    """Start every reader at once; seconds until the last one is done."""
    started = time.perf_counter()
    readers = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for argv in argvs]
    try:
        outputs = [reader.communicate(timeout=1800)[0] for reader in readers]
    finally:
        for reader in readers:
            if reader.poll() is None:
                reader.kill()
                reader.wait()
    seconds = time.perf_counter() - started
    for reader, output in zip(readers, outputs):
        if reader.returncode != 0:
            raise SystemExit(f"a reader failed ({reader.returncode}): {output[-800:]}")
    return seconds


def p90(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=10, method="inclusive")[-1] \
        if len(samples) > 1 else samples[0]


def measure_starts(store: Store, starts: int) -> dict[str, Any]:
    session = store.new_session()
    first, _ = store.start(session, 0)
    store.stop(session)
    calls, logins = [], []
    for _ in range(starts):
        seconds, seat = store.start(session, 0)
        began = time.perf_counter()
        read = seat.io("read -q 0 64k")
        logins.append(time.perf_counter() - began)
        if read.returncode != 0:
            raise SystemExit(f"the seat could not read its started session: {read.stderr}")
        calls.append(seconds)
        store.stop(session)
    result = {"first": first, "median": statistics.median(calls), "p90": p90(calls),
              "login": statistics.median(logins)}
    print(f"  start: median {result['median'] * 1000:.0f} ms, p90 {result['p90'] * 1000:.0f} ms"
          f" over {starts} (first start of the store {first * 1000:.0f} ms); the seat's login"
          f" + 64 KiB read {result['login'] * 1000:.0f} ms", flush=True)
    return result


def measure_readers(store: Store, seats: int, image: Path, size: int) -> dict[str, Any]:
    seat_disks = []
    for seat in range(seats):
        _, seat_disk = store.start(store.new_session(), seat)
        seat_disks.append(seat_disk)
    first = seat_disks[0]
    compared = subprocess.run(["qemu-img", "compare", *secret_object(first), "--image-opts",
                               f"driver=raw,file.driver=file,file.filename={image}",
                               iscsi_opts(first)], check=False, capture_output=True,
                              text=True, timeout=900)
    if compared.returncode != 0:
        raise SystemExit(f"seat 1's disk differs from the template: {compared.stdout}"
                         f"{compared.stderr}")
    warm(image)
    if store.backend == "local":
        warm(store.template_file())  # what the overlays read (cp --sparse: not a baseline)
    one_local = run_readers([local_reader(image, size)])
    local = run_readers([local_reader(image, size)] * seats)
    window = CpuWindow(store.daemons())
    one_seat = run_readers([iscsi_reader(first, size)])
    one_cpu = cpu_verdict(*window.close("qemu-img reader"))
    window = CpuWindow(store.daemons())
    iscsi = run_readers([iscsi_reader(seat_disk, size) for seat_disk in seat_disks])
    result = {"one_local": size / MIB / one_local, "local": seats * size / MIB / local,
              "one_seat": size / MIB / one_seat, "iscsi": seats * size / MIB / iscsi,
              "cpu": cpu_verdict(*window.close("qemu-img readers"))}
    print(f"  locally: 1 reader {result['one_local']:.0f} MiB/s, {seats} readers at once "
          f"{result['local']:.0f} MiB/s aggregate\n"
          f"  1 seat alone: {result['one_seat']:.0f} MiB/s ({one_seat:.1f} s); {one_cpu}\n"
          f"  {seats} seats at once: {result['iscsi']:.0f} MiB/s aggregate ({iscsi:.1f} s); "
          f"{result['cpu']}", flush=True)
    for session in store.api("GET", "/v1/sessions")["sessions"]:
        if session["state"] == "running":
            store.stop(session["uuid"])
    return result


def measure_writes(store: Store, work: Path, size: int) -> dict[str, Any]:
    source = work / "random.bin"
    source.write_bytes(os.urandom(WRITTEN))
    piece = WRITTEN // SPREAD_WRITES
    step = size // SPREAD_WRITES // piece * piece
    cases = {"at once": [(size // 4 // (4 * MIB) * 4 * MIB, WRITTEN)],
             "spread": [(i * step, piece) for i in range(SPREAD_WRITES)]}
    result = {}
    for name, extents in cases.items():
        session = store.new_session()
        _, seat = store.start(session, 0)
        write_random(seat, source, extents)
        reported = store.stop(session)["used_bytes"]
        measured = independent_use(store, session)
        result[name] = (reported, measured)
        print(f"  50 MiB written {name}: the store reports {reported / MIB:.1f} MiB, "
              + ", ".join(f"{how} {used / MIB:.1f} MiB" for how, used in measured.items()),
              flush=True)
    return result


def independent_use(store: Store, session: str) -> dict[str, int]:
    if store.ceph is not None:
        info = json.loads(store.ceph.rbd("info", "--format", "json", f"ses.{session}"))
        print(f"  (the clone's objects: {info['object_size'] // 1024} KiB, order "
              f"{info['order']})", flush=True)
        usage = json.loads(store.ceph.rbd("du", "--format", "json", f"ses.{session}"))
        return {"rbd du": sum(image["used_size"] for image in usage["images"])}
    overlay = store.overlay(session)
    allocated = subprocess.run(["du", "-B1", str(overlay)], capture_output=True, text=True,
                               check=True).stdout.split()[0]
    extents = json.loads(subprocess.run(["qemu-img", "map", "--output=json", "-f", "qcow2",
                                         str(overlay)], capture_output=True, text=True,
                                        check=True).stdout)
    in_overlay = sum(e["length"] for e in extents if e["depth"] == 0 and e["data"])
    return {"du": int(allocated), "qemu-img map (data in the overlay)": in_overlay}


def bench_store(backend: str, procs: Processes, work: Path, image: Path,
                args: argparse.Namespace, stack: contextlib.ExitStack) -> dict[str, Any]:
    ceph = None
    if backend == "ceph":
        if missing_tools():
            raise SystemExit(f"missing {', '.join(missing_tools())}: install ceph-mon "
                             "ceph-osd ceph-common python3-rbd tgt-rbd")
        ceph = stack.enter_context(CephCluster(
            Path(tempfile.mkdtemp(prefix="lm-bs-ceph-")),
            memstore_bytes=3 * args.template_mib * MIB + 2 * 2**30))
        print(f"  single-node Ceph (memstore) up in {ceph.startup_seconds:.1f} s", flush=True)
    started = time.perf_counter()
    store = open_store(backend, procs, work, image, args.seats, ceph, stack,
                       args.ceph_object_order)
    print(f"  service up, image uploaded, template made, {args.seats} seats enrolled "
          f"({time.perf_counter() - started:.1f} s)", flush=True)
    size = args.template_mib * MIB
    return {"starts": measure_starts(store, args.starts),
            "readers": measure_readers(store, args.seats, image, size),
            "writes": measure_writes(store, work, size)}


# -- the report --------------------------------------------------------------------------
def figures(result: dict[str, Any], seats: int) -> list[tuple[str, str]]:
    """(label, figure) of one store, each ratio under the figure it divides."""
    starts, readers, writes = result["starts"], result["readers"], result["writes"]
    login = starts["login"]
    rows = [("start, median / p90",
             f"{starts['median'] * 1000:.0f} / {starts['p90'] * 1000:.0f} ms"),
            ("  ÷ the seat's login + 64 KiB read",
             f"{starts['median'] / login:.1f} / {starts['p90'] / login:.1f}"),
            ("1 seat reading alone", f"{readers['one_seat']:.0f} MiB/s"),
            ("  ÷ 1 local reader",
             f"{readers['one_seat'] / readers['one_local']:.2f} (of {readers['one_local']:.0f})"),
            (f"{seats} seats reading at once", f"{readers['iscsi']:.0f} MiB/s"),
            (f"  ÷ {seats} local readers at once",
             f"{readers['iscsi'] / readers['local']:.2f} (of {readers['local']:.0f})")]
    for case, (reported, measured) in writes.items():
        rows += [(f"50 MiB written {case}: used ÷ 50 MiB", f"{reported / WRITTEN:.2f}"),
                 ("  measured ÷ 50 MiB",
                  " / ".join(f"{used / WRITTEN:.2f}" for used in measured.values()))]
    return rows


def table(results: dict[str, dict[str, Any]], seats: int) -> list[str]:
    columns = {name: figures(result, seats) for name, result in results.items()}
    labels = [label for label, _ in next(iter(columns.values()))]
    width = max(map(len, labels)) + 2
    cells = {name: max(len(name), *(len(figure) for _, figure in rows)) + 3
             for name, rows in columns.items()}
    lines = [" " * width + "".join(name.rjust(cells[name]) for name in columns)]
    for index, label in enumerate(labels):
        lines.append(label.ljust(width) + "".join(rows[index][1].rjust(cells[name])
                                                 for name, rows in columns.items()))
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("local", "ceph", "both"), default="both")
    parser.add_argument("--seats", type=int, default=20)
    parser.add_argument("--template-mib", type=int, default=1024)
    parser.add_argument("--starts", type=int, default=10)
    parser.add_argument("--ceph-object-order", type=int, metavar="N",
                        help="the ceph store's clones: 2**N-byte objects (12..25); "
                             "default: the service's ceph_object_order")
    args = parser.parse_args()
    if args.template_mib < 64 or args.seats < 1 or args.starts < 1:
        parser.error("--template-mib >= 64, --seats >= 1, --starts >= 1")
    if args.ceph_object_order is not None and not 12 <= args.ceph_object_order <= 25:
        parser.error("--ceph-object-order: 12 to 25")
    backends = ["local", "ceph"] if args.backend == "both" else [args.backend]

    def interrupted(signum: int, _frame: Any) -> None:
        for ignored in (signal.SIGINT, signal.SIGTERM):  # the clean-up is not interrupted
            signal.signal(ignored, signal.SIG_IGN)
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    work = Path(tempfile.mkdtemp(prefix="labmetal-bench-sessions-", dir="/var/tmp"))
    procs = Processes(work)
    results: dict[str, dict[str, Any]] = {}
    try:
        image = template_image(work, args.template_mib)
        allocated = int(subprocess.run(["du", "-m", str(image)], capture_output=True,
                                       text=True, check=True).stdout.split()[0])
        print(f"template: {args.template_mib} MiB raw disk, ext4 {FILL_SHARE:.0%} full of "
              f"{FILL_FROM} files ({allocated} MiB allocated); {args.seats} seats, "
              f"{CORES} cores; readers: qemu-img convert to null, {DEPTH} "
              f"requests of 2 MiB in flight", flush=True)
        for backend in backends:
            print(f"{backend} store:", flush=True)
            with contextlib.ExitStack() as stack:
                stack.callback(procs.stop_all)
                results[backend] = bench_store(backend, procs, work, image, args, stack)
        print()
        print("\n".join(table(results, args.seats)))
        measured = "; ".join(f"{name}: {' / '.join(result['writes']['at once'][1])}"
                             for name, result in results.items())
        print(f"(each ratio: the store's figure ÷ a baseline measured in the same run; used: "
              f"the store's used_bytes; measured: {measured})")
    except KeyboardInterrupt:
        print("interrupted: cleaning up", flush=True)
        return 130
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
