"""Students' session disks (issue 7), the same story on both storage backends: ``local``
(qcow2 overlay + qemu-storage-daemon FUSE export + tgtd) and ``ceph`` (RBD clone served by
tgtd's rbd backing store, on a single-node cluster started for this module).

Seats are qemu-io over iSCSI (libiscsi, in userspace) on 127.0.0.x, logging in with their
own initiator name and the session's CHAP account. Teardown stops everything the tests
started, also when a test fails: tgtd and every qemu-storage-daemon first, the Ceph daemons
last; then it checks that no process, FUSE mount or directory is left.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from labmetal.images.overlays.base import OverlayBackend, OverlayError, Quota, Reason
from labmetal.images.overlays.tgt import SessionTargets, process_alive

from labmetal.lab.iscsi_seat import IscsiSeat
from tests.iscsi_seat import storage_tools  # noqa: F401 (autouse fixture)
from labmetal.lab.ceph import CephCluster, missing_tools
from labmetal.lab.harness import free_port

MiB = 2**20
GiB = 2**30
TEMPLATE_BYTE = 0x54  # what the template holds in its first 8 MiB
PORTAL_IPS = {"local": "127.0.0.2", "ceph": "127.0.0.3"}


def iqn(name: str) -> str:
    return f"iqn.2024-09.org.labmetal:session.{name}"


def seat_initiator(seat: str) -> str:
    return f"iqn.2024-09.org.labmetal.seat:{seat}"


# -- fixtures --

@pytest.fixture(scope="module")
def ceph_cluster():
    """One cluster for the module's ceph tests (started only if one runs)."""
    missing = missing_tools()
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: install the Debian packages ceph-mon "
                    "ceph-osd ceph-common python3-rbd tgt-rbd")
    root = Path(tempfile.mkdtemp(prefix="lm-ceph-"))
    with CephCluster(root) as cluster:
        print(f"\nsingle-node Ceph: writable pool in {cluster.startup_seconds:.1f} s")
        yield cluster
    assert not any(process_alive(pid) for pid in cluster.pids)
    assert not root.exists()


@dataclass
class Store:
    backend: OverlayBackend
    targets: SessionTargets
    work: Path
    kind: str


def open_backend(kind: str, run_dir: Path, data_dir: Path, ceph: CephCluster | None,
                 quota: Quota | None = None, **options) -> OverlayBackend:
    """``options``: more of the backend's settings (``object_order`` for ceph)."""
    targets = SessionTargets(run_dir / "tgt", PORTAL_IPS[kind], free_port())
    if kind == "local":
        from labmetal.images.overlays.local import LocalOverlays
        return LocalOverlays(data_dir, targets, run_dir=run_dir / "qsd", quota=quota,
                             **options)
    from labmetal.images.overlays.ceph import CephOverlays
    assert ceph is not None
    return CephOverlays(ceph.conf_path, ceph.pool, targets, quota=quota, timeout=5, **options)


@pytest.fixture(params=["local", "ceph"])
def stores(request, tmp_path):
    """Makes backends of this test's kind; each is closed at teardown, tgtd first, and
    its sessions and templates removed from the (shared) Ceph pool."""
    kind = request.param
    ceph = request.getfixturevalue("ceph_cluster") if kind == "ceph" else None
    run_dir = Path(tempfile.mkdtemp(prefix="lm-ov-"))  # short: unix socket paths
    made: list[Store] = []

    def make(quota: Quota | None = None, **options) -> Store:
        backend = open_backend(kind, run_dir / str(len(made)), tmp_path / f"data{len(made)}",
                               ceph, quota, **options)
        made.append(Store(backend, backend.targets, tmp_path, kind))
        return made[-1]

    yield make
    for store in made:
        tgtd = store.targets.pid
        store.backend.close()
        assert tgtd is None or not process_alive(tgtd)
    if ceph is not None:
        purge_pool(ceph)
    assert not qemu_storage_daemons(run_dir)
    assert str(run_dir) not in Path("/proc/self/mountinfo").read_text()
    shutil.rmtree(run_dir)


@pytest.fixture
def store(stores) -> Store:
    return stores()


def purge_pool(ceph: CephCluster) -> None:
    images = ceph.rbd("ls").split()
    for name in sorted(images, key=lambda n: not n.startswith("ses.")):  # clones first
        for line in ceph.rbd("snap", "ls", name).splitlines()[1:]:
            snap = line.split()[1]
            if name.startswith("tpl."):
                ceph.rbd("snap", "unprotect", f"{name}@{snap}")
        ceph.rbd("snap", "purge", name)
        ceph.rbd("rm", name)


def qemu_storage_daemons(run_dir: Path) -> list[int]:
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-storage-daemon" in cmdline and str(run_dir).encode() in cmdline \
                and process_alive(int(proc.name)):
            found.append(int(proc.name))
    return found


# -- a seat: qemu-io over iSCSI --

def seat_for(store: Store, session_id: str, seat: str, secret: str | None = None) -> IscsiSeat:
    secret = secret or f"{session_id}-chap-secret"
    export = store.backend.export(session_id, iqn(session_id), f"student-{session_id}",
                                  secret, seat_initiator(seat))
    secret_file = store.work / f"secret-{session_id}-{seat}"
    secret_file.write_text(secret)
    return IscsiSeat(seat_initiator(seat), export.portal, export.iqn, f"student-{session_id}",
                     secret_file, export.lun)


def raw_template(path: Path, size: int = 64 * MiB, byte: int = TEMPLATE_BYTE) -> Path:
    """A sparse raw image: ``byte`` in its first 8 MiB, zeros (holes) after."""
    with open(path, "wb") as image:
        image.write(bytes([byte]) * 8 * MiB)
        image.truncate(size)
    return path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


# -- the story --

def test_each_student_writes_only_their_own_session(store, tmp_path):
    backend = store.backend
    source = raw_template(tmp_path / "tp3.raw")
    before = sha256(source)
    template = backend.make_template("tp3-reseaux", 1, source)
    assert (template.version, template.size) == (1, 64 * MiB)
    backend.create_session("alice-tp3", "tp3-reseaux", 1)
    backend.create_session("bob-tp3", "tp3-reseaux", 1)
    assert backend.sessions() == ["alice-tp3", "bob-tp3"]

    alice = seat_for(store, "alice-tp3", "a01")
    bob = seat_for(store, "bob-tp3", "a02")
    alice.write(0xA1, 0, MiB)
    alice.write(0xA2, 40 * MiB, MiB)
    assert alice.holds(0xA1, 0, MiB) and alice.holds(0xA2, 40 * MiB, MiB)
    assert alice.holds(TEMPLATE_BYTE, MiB, 7 * MiB)  # the rest still reads as the template
    assert bob.holds(TEMPLATE_BYTE, 0, 8 * MiB) and bob.holds(0, 40 * MiB, MiB)
    assert sha256(source) == before

    # a seat reaches only its own target: Bob's PC on Alice's session, with her secret
    wrong_seat = alice.io("read 0 512", initiator=seat_initiator("a02"))
    assert wrong_seat.returncode != 0
    # the right seat with a wrong password
    guess = tmp_path / "guess"
    guess.write_text("not-her-secret")
    wrong_password = IscsiSeat(alice.initiator, alice.portal, alice.iqn, alice.chap_user,
                               guess).io("read 0 512")
    assert wrong_password.returncode != 0 and "Authentication failure" in wrong_password.stderr
    with pytest.raises(OverlayError, match="alice-tp3 is already exported") as busy:
        seat_for(store, "alice-tp3", "a03")
    assert busy.value.reason is Reason.BUSY

    # a new template version changes no existing session; new sessions get it
    backend.make_template("tp3-reseaux", 2, raw_template(tmp_path / "v2.raw", byte=0x32))
    assert bob.holds(TEMPLATE_BYTE, 0, 8 * MiB) and alice.holds(0xA1, 0, MiB)
    backend.create_session("carol-tp3", "tp3-reseaux", 2)
    carol = seat_for(store, "carol-tp3", "a03")
    assert carol.holds(0x32, 0, 8 * MiB)
    assert backend.describe("carol-tp3").version == 2
    assert [(t.name, t.version) for t in backend.templates()] == [("tp3-reseaux", 1),
                                                                  ("tp3-reseaux", 2)]
    with pytest.raises(OverlayError, match="version 1 exists and is frozen"):
        backend.make_template("tp3-reseaux", 1, source)


def test_save_write_revert_and_reset(store, tmp_path):
    backend = store.backend
    backend.make_template("tp1", 1, raw_template(tmp_path / "tp1.raw"))
    backend.create_session("dave-tp1", "tp1", 1)
    seat = seat_for(store, "dave-tp1", "b01")
    seat.write(0x11, 0, MiB)
    first = backend.save("dave-tp1", "after exercise 1")  # while the seat is connected
    seat.write(0x22, 0, MiB)
    seat.write(0x22, 20 * MiB, MiB)
    second = backend.save("dave-tp1", "exercise 2")
    seat.write(0x33, 0, MiB)
    assert [(s.label, s.number) for s in backend.list_saves("dave-tp1")] == [
        ("after exercise 1", 1), ("exercise 2", 2)]

    with pytest.raises(OverlayError, match="exported to a seat and cannot be reverted") as busy:
        backend.revert("dave-tp1", first)
    assert busy.value.reason is Reason.BUSY
    backend.unexport("dave-tp1")
    backend.revert("dave-tp1", first)
    seat = seat_for(store, "dave-tp1", "b01")
    assert seat.holds(0x11, 0, MiB) and seat.holds(0, 20 * MiB, MiB)
    backend.unexport("dave-tp1")
    backend.revert("dave-tp1", second.save_id)  # later save points survive a revert
    seat = seat_for(store, "dave-tp1", "b01")
    assert seat.holds(0x22, 0, MiB) and seat.holds(0x22, 20 * MiB, MiB)
    backend.unexport("dave-tp1")
    with pytest.raises(OverlayError, match="no save point save.9.nope") as missing:
        backend.revert("dave-tp1", "save.9.nope")
    assert missing.value.reason is Reason.NOT_FOUND

    reset = backend.reset("dave-tp1")
    assert (reset.template, reset.version) == ("tp1", 1)
    assert backend.list_saves("dave-tp1") == []
    seat = seat_for(store, "dave-tp1", "b01")
    assert seat.holds(TEMPLATE_BYTE, 0, 8 * MiB) and seat.holds(0, 20 * MiB, MiB)
    backend.unexport("dave-tp1")
    backend.delete("dave-tp1")
    assert backend.sessions() == []
    with pytest.raises(OverlayError, match="no session dave-tp1") as gone:
        backend.save("dave-tp1", "too late")
    assert gone.value.reason is Reason.NOT_FOUND


def test_storage_follows_the_students_changes(store, tmp_path, capsys):
    """50 MiB written into a session of a 1 GiB template costs about 50 MiB."""
    backend = store.backend
    started = time.monotonic()
    backend.make_template("big", 1, raw_template(tmp_path / "big.raw", size=GiB))
    template_seconds = time.monotonic() - started
    started = time.monotonic()
    disk = backend.create_session("erin-big", "big", 1)
    create_seconds = time.monotonic() - started
    assert disk.size == GiB and disk.used_bytes < 1 * MiB
    started = time.monotonic()
    seat = seat_for(store, "erin-big", "c01")
    export_seconds = time.monotonic() - started
    seat.write(0x5A, 100 * MiB, 50 * MiB)
    used = backend.used_bytes("erin-big")
    saved = backend.save("erin-big", "50 MiB written")
    seat.write(0x5B, 100 * MiB, 4 * MiB)  # changes after a save cost only themselves
    after_save = backend.used_bytes("erin-big")
    assert saved.label == "50 MiB written"
    assert 50 * MiB <= used <= 56 * MiB, used
    assert after_save - used <= 8 * MiB, (used, after_save)
    with capsys.disabled():
        print(f"\n[{store.kind}] 1 GiB template made in {template_seconds:.2f} s; session "
              f"created in {create_seconds * 1000:.0f} ms, exported in "
              f"{export_seconds * 1000:.0f} ms; after 50 MiB written: {used / MiB:.1f} MiB "
              f"used; saved, then 4 MiB rewritten: {after_save / MiB:.1f} MiB")


@pytest.mark.parametrize("stores", ["ceph"], indirect=True)
def test_scattered_small_writes_cost_about_their_bytes_on_ceph(stores, ceph_cluster, tmp_path):
    """A clone copies up a whole object on its first write there: a session's clone has
    the configured object size (64 KiB by default, not the template's 4 MiB), so 100
    writes of 64 KiB spread over a 256 MiB template cost about 6.25 MiB, not 100 objects
    of 4 MiB. A service restarted with another size makes its new clones (a reset too)
    with that one."""
    from labmetal.config import Settings

    store = stores()
    backend = store.backend
    assert backend.object_order == Settings().ceph_object_order == 16
    backend.make_template("tp8", 1, raw_template(tmp_path / "tp8.raw", size=256 * MiB))
    backend.create_session("max-tp8", "tp8", 1)
    assert clone_order(ceph_cluster, "max-tp8") == 16
    seat = seat_for(store, "max-tp8", "h01")
    piece, count = 64 * 1024, 100
    step = 256 * MiB // count // piece * piece  # 2.5 MiB: every write in another 4 MiB
    for number in range(count):
        seat.write(0xB0 + number % 16, number * step, piece)
    assert seat.holds(0xB0, 0, piece) and seat.holds(0xB3, 3 * step, piece)
    assert seat.holds(TEMPLATE_BYTE, piece, step - piece)  # the template around them
    assert seat.holds(0, 99 * step + piece, 256 * MiB - 99 * step - piece)
    written = count * piece
    used = backend.used_bytes("max-tp8")
    assert written <= used <= 2 * written, (used, written)
    backend.unexport("max-tp8")

    restarted = stores(object_order=20).backend
    restarted.reset("max-tp8")
    restarted.create_session("ned-tp8", "tp8", 1)
    assert clone_order(ceph_cluster, "max-tp8") == clone_order(ceph_cluster, "ned-tp8") == 20
    assert restarted.used_bytes("max-tp8") == 0
    print(f"[ceph] {count} writes of 64 KiB spread over 256 MiB: {used / MiB:.2f} MiB used "
          f"({used / written:.2f} x the bytes written)")


def clone_order(ceph: CephCluster, session_id: str) -> int:
    """The session image's object size (2**order bytes), as librbd says."""
    import rados
    import rbd
    with rados.Rados(conffile=str(ceph.conf_path)) as cluster, \
            cluster.open_ioctx(ceph.pool) as ioctx, \
            rbd.Image(ioctx, f"ses.{session_id}", read_only=True) as image:
        return image.stat()["order"]


def test_killed_tgtd_then_the_session_resumes_with_its_data(store, tmp_path):
    backend = store.backend
    backend.make_template("tp2", 1, raw_template(tmp_path / "tp2.raw"))
    backend.create_session("fay-tp2", "tp2", 1)
    seat = seat_for(store, "fay-tp2", "d01")
    seat.write(0x44, 4 * MiB, 2 * MiB)
    tgtd = store.targets.pid
    os.kill(tgtd, signal.SIGKILL)
    assert seat.io("read 0 512").returncode != 0
    assert not backend.is_exported("fay-tp2")

    seat = seat_for(store, "fay-tp2", "d01")  # resume: a new tgtd, the same data
    assert store.targets.pid != tgtd
    assert seat.holds(0x44, 4 * MiB, 2 * MiB) and seat.holds(TEMPLATE_BYTE, 0, 4 * MiB)
    seat.write(0x45, 0, MiB)
    assert seat.holds(0x45, 0, MiB)


CRASH_SAVE = """
import sys
sys.path.insert(0, {repo!r})
from pathlib import Path
from tests.test_overlays import open_backend
from labmetal.lab.ceph import CephCluster
kind, run_dir, data_dir, conf, pool = sys.argv[1:6]
ceph = None
if kind == "ceph":
    ceph = CephCluster.__new__(CephCluster)
    ceph.conf_path, ceph.pool = Path(conf), pool
backend = open_backend(kind, Path(run_dir), Path(data_dir), ceph)
snapshot = backend._save

def announced(*args):
    print("snapshotting", flush=True)  # the parent kills from here on
    return snapshot(*args)

backend._save = announced
backend.save("gus-tp4", "crashed")
print("saved", flush=True)
"""


def test_a_crash_during_save_keeps_the_previous_save(store, tmp_path, ceph_for_kind):
    """A save is interrupted by SIGKILL: the saving process is killed 0-30 ms after it
    starts the snapshot step (for local, together with the qemu-storage-daemon that writes
    the qcow2's metadata; for ceph the OSD makes the snapshot, the client dies). Whatever
    the kill interrupted (nothing yet, the snapshot half-written, or a save completed),
    the previous save point is listed as it was and reverts to its data, and the session
    is served again (for local after a ``qemu-img check -r leaks``)."""
    backend = store.backend
    backend.make_template("tp4", 1, raw_template(tmp_path / "tp4.raw"))
    backend.create_session("gus-tp4", "tp4", 1)
    seat = seat_for(store, "gus-tp4", "e01")
    seat.write(0x61, 0, 4 * MiB)
    good = backend.save("gus-tp4", "good")
    completed = []
    for attempt, delay in enumerate((0, 0.003, 0.01, 0.03)):
        seat.write(0x70 + attempt, 0, 4 * MiB)
        daemon = backend._daemon_pid("gus-tp4") if store.kind == "local" else None
        ceph = ceph_for_kind
        child = subprocess.Popen(
            [sys.executable, "-c", CRASH_SAVE.format(repo=str(Path(__file__).parents[1])),
             store.kind,
             str(backend.run_dir.parent) if store.kind == "local" else str(tmp_path / "c"),
             str(backend.root) if store.kind == "local" else "-",
             str(ceph.conf_path) if ceph else "-", ceph.pool if ceph else "-"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = child.stdout.readline().strip()
        assert line == "snapshotting", line + child.stderr.read()
        time.sleep(delay)
        child.kill()
        if daemon:
            os.kill(daemon, signal.SIGKILL)
        child.wait()
        labels = [s.label for s in backend.list_saves("gus-tp4")]
        completed.append(labels.count("crashed"))
        assert backend.list_saves("gus-tp4")[0] == good
        backend.unexport("gus-tp4")
        seat = seat_for(store, "gus-tp4", "e01")
    backend.unexport("gus-tp4")
    backend.revert("gus-tp4", good)
    seat = seat_for(store, "gus-tp4", "e01")
    assert seat.holds(0x61, 0, 4 * MiB)
    print(f"[{store.kind}] {len(completed)} saves killed mid-way: the previous save intact "
          f"every time; {completed[-1]} of them had completed before the kill")


@pytest.fixture
def ceph_for_kind(request, store):
    return request.getfixturevalue("ceph_cluster") if store.kind == "ceph" else None


def test_quota_refusals_say_the_numbers(stores, tmp_path):
    store = stores(Quota(per_session=8 * MiB, total=16 * MiB))
    backend = store.backend
    backend.make_template("tp5", 1, raw_template(tmp_path / "tp5.raw"))
    backend.create_session("hal-tp5", "tp5", 1)
    seat = seat_for(store, "hal-tp5", "f01")
    seat.write(0x55, 0, 2 * MiB)
    backend.save("hal-tp5", "small")
    seat.write(0x56, 8 * MiB, 16 * MiB)
    with pytest.raises(OverlayError, match=r"session hal-tp5 cannot be saved: it uses "
                       r"[\d.]+ MiB \(\d+ bytes\), over its quota of 8.0 MiB \(8388608 "
                       r"bytes\)") as refused:
        backend.save("hal-tp5", "big")
    assert refused.value.reason is Reason.QUOTA
    assert [s.label for s in backend.list_saves("hal-tp5")] == ["small"]
    backend.unexport("hal-tp5")
    with pytest.raises(OverlayError, match="quota") as refused:
        backend.create_session("ida-tp5", "tp5", 1)
    assert "of their 16.0 MiB (16777216 bytes) quota" in str(refused.value)
    backend.reset("hal-tp5")
    backend.create_session("ida-tp5", "tp5", 1)


def test_refusals_name_what_is_wrong(store, tmp_path):
    backend = store.backend
    with pytest.raises(OverlayError, match="no template nope version 1") as error:
        backend.create_session("jo-tp6", "nope", 1)
    assert error.value.reason is Reason.NOT_FOUND
    with pytest.raises(OverlayError, match="not a valid name") as error:
        backend.create_session("../etc", "tp6", 1)
    assert error.value.reason is Reason.INVALID
    qcow2 = tmp_path / "image.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "16M"], check=True)
    with pytest.raises(OverlayError, match="cannot be a template") as error:
        backend.make_template("tp6", 1, qcow2)
    assert error.value.reason is Reason.INVALID
    backend.make_template("tp6", 1, raw_template(tmp_path / "tp6.raw"))
    backend.create_session("jo-tp6", "tp6", 1)
    with pytest.raises(OverlayError, match="exists already"):
        backend.create_session("jo-tp6", "tp6", 1)
    with pytest.raises(OverlayError, match="save label"):
        backend.save("jo-tp6", "a/b")
    with pytest.raises(OverlayError, match="never exported to every initiator"):
        backend.export("jo-tp6", iqn("jo-tp6"), "jo", "secret-jo-1234", [])


def test_ceph_stopped_then_session_start_fails_clearly(tmp_path):
    """Its own cluster, so the module's stays up: stopped (SIGKILL) after the template is
    imported, a new session is refused within the client's timeout, saying Ceph is down."""
    if missing_tools():
        pytest.fail("missing Ceph tools (ceph-mon ceph-osd ceph-common python3-rbd)")
    root = Path(tempfile.mkdtemp(prefix="lm-ceph-down-"))
    run_dir = Path(tempfile.mkdtemp(prefix="lm-ov-"))
    with CephCluster(root) as ceph:
        backend = open_backend("ceph", run_dir, tmp_path, ceph)
        try:
            backend.make_template("tp7", 1, raw_template(tmp_path / "tp7.raw"))
            backend.create_session("kim-tp7", "tp7", 1)
            ceph.kill()
            started = time.monotonic()
            with pytest.raises(OverlayError, match="Ceph is unavailable: could not .* within "
                               "5 s .*is the cluster running") as error:
                backend.create_session("lea-tp7", "tp7", 1)
            assert error.value.reason is Reason.UNAVAILABLE
            assert time.monotonic() - started < 20
            with pytest.raises(OverlayError, match="Ceph is unavailable"):
                backend.export("kim-tp7", iqn("kim-tp7"), "kim", "secret-kim-1234",
                               seat_initiator("g01"))
        finally:
            backend.close()
    assert not root.exists()
    shutil.rmtree(run_dir)
