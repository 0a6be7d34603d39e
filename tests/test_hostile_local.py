"""Issue 14, the local side: another user on the server, and uploads that grow.

Each story runs against the real thing: `labmetal serve` for authentication and file modes,
another Unix user (nobody, through setpriv) planting a run directory, a real tgtd for CHAP
accounts, qemu-img's compressed qcow2 on a small tmpfs for the image store.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
import requests

from labmetal.agent.iscsi import Chap, TgtExporter
from labmetal.config import Settings, is_loopback
from labmetal.conductor.iscsi_writer import IscsiWriteError, capture_over_iscsi
from labmetal.images.inspect import ImageRejected
from labmetal.images.overlays.local import LocalOverlays
from labmetal.images.overlays.tgt import SessionTargets
from labmetal.images.store import ImageStore, StoreFull
from labmetal.rundir import UnsafeDirectory, private_dir
from labmetal.lab.harness import LABMETAL, free_port, service_env

MiB = 1024 * 1024
NOBODY = 65534


def as_nobody(*argv: str) -> subprocess.CompletedProcess:
    """A command run by another local user, as a student with a shell on the server."""
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                           "--clear-groups", *argv], capture_output=True, text=True, timeout=30)


def private(path: Path) -> bool:
    info = os.lstat(path)
    return info.st_uid == os.geteuid() and not stat.S_IMODE(info.st_mode) & 0o077


# -- 1. no silent noauth --------------------------------------------------------------------

def test_loopback_is_told_apart_from_addresses_others_reach():
    assert all(map(is_loopback, ["127.0.0.1", "127.3.4.5", "::1", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.99.1.2", "192.0.2.7"]))


def test_serve_asks_for_accounts_by_default(procs, tmp_path):
    state_dir = tmp_path / "state"
    subprocess.run([LABMETAL, "user", "set", "ada", "--role", "admin", "--password-stdin",
                    "--state-dir", str(state_dir)], input="Lovelace-1815\n", check=True,
                   capture_output=True, text=True)
    url = f"http://127.0.0.1:{free_port()}"
    proc = procs.start([LABMETAL, "serve"], "default-auth",
                       service_env(state_dir=state_dir, listen=url.split("//")[1]))
    proc.wait_for_output("listening on http://", timeout=60)
    assert requests.get(f"{url}/v1/nodes", timeout=30).status_code == 401
    assert requests.get(f"{url}/v1/nodes", auth=("ada", "Lovelace-1815"), timeout=30).ok


def test_noauth_off_loopback_is_refused_unless_said_explicitly(procs, tmp_path):
    listen = f"0.0.0.0:{free_port()}"
    refused = procs.start([LABMETAL, "serve", "--auth", "noauth", "--listen", listen],
                          "noauth-refused", service_env(state_dir=tmp_path / "a"))
    assert refused.popen is not None and refused.popen.wait(timeout=60) == 2
    assert "refusing to serve the API on 0.0.0.0" in refused.output()
    assert "--insecure-noauth" in refused.output()
    assert "listening" not in refused.output()

    allowed = procs.start([LABMETAL, "serve", "--auth", "noauth", "--listen", listen,
                           "--insecure-noauth"], "noauth-flag",
                          service_env(state_dir=tmp_path / "b"))
    allowed.wait_for_output("listening on http://", timeout=60)
    assert "authentication is OFF (auth = noauth)" in allowed.output()

    by_environment = procs.start([LABMETAL, "serve"], "noauth-env",
                                 service_env(state_dir=tmp_path / "c",
                                             listen=f"0.0.0.0:{free_port()}",
                                             auth="noauth", allow_noauth="true"))
    by_environment.wait_for_output("listening on http://", timeout=60)
    assert "every caller of the API at 0.0.0.0" in by_environment.output()


# -- 2. run directories -----------------------------------------------------------------------

@pytest.fixture
def victim(tmp_path):
    """A root-owned directory a hostile user would like root to write into."""
    directory = tmp_path / "victim"
    directory.mkdir()
    return directory


@pytest.fixture
def shared():
    """A directory like /tmp: anyone may make things in it, sticky."""
    directory = Path(tempfile.mkdtemp(prefix="lm-hostile-"))
    directory.chmod(0o1777)
    yield directory
    shutil.rmtree(directory)


def test_a_run_directory_planted_by_another_user_is_not_followed(tmp_path, victim):
    """The review's attack: the default run directory's name is known in advance; another
    user makes it first, as a symbolic link to a directory of root's."""
    settings = Settings(state_dir=tmp_path / "state", overlay_backend="local").session_store
    run_dir = settings.overlay_run_path
    planted = as_nobody("ln", "-s", str(victim), str(run_dir)).returncode == 0
    made: list[Path] = []
    try:
        # What conductor/session_store.py does when a session store is first used.
        targets = SessionTargets(run_dir / "tgt", "127.0.0.1", free_port())
        try:
            backend = LocalOverlays(settings.overlay_path, targets, run_dir=run_dir / "qsd")
        except UnsafeDirectory as refused:
            assert planted and str(run_dir) in str(refused)
        else:
            made.append(backend.run_dir.parent)
            assert backend.run_dir.parent.resolve() == run_dir
            assert private(run_dir) and private(backend.run_dir)
        assert not any(victim.iterdir()), "root wrote where the other user pointed"
    finally:
        if planted:
            Path(run_dir).unlink()
        for directory in made:
            shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("planted", ["symlink", "their directory", "loose mode",
                                     "their parent", "writable parent"])
def test_a_run_directory_that_is_not_ours_alone_is_refused(shared, victim, planted):
    run_dir = shared / "labmetal-run"
    if planted == "symlink":
        assert as_nobody("ln", "-s", str(victim), str(run_dir)).returncode == 0
    elif planted == "their directory":
        assert as_nobody("mkdir", "-m", "700", str(run_dir)).returncode == 0
    elif planted == "loose mode":
        run_dir.mkdir()
        run_dir.chmod(0o755)
    elif planted == "their parent":
        assert as_nobody("mkdir", "-m", "755", str(shared / "parent")).returncode == 0
        run_dir = shared / "parent" / "run"
    else:
        (shared / "parent").mkdir(mode=0o777)
        (shared / "parent").chmod(0o777)
        run_dir = shared / "parent" / "run"
    with pytest.raises(UnsafeDirectory, match="refusing to use"):
        private_dir(run_dir)
    assert not any(victim.iterdir())


def test_a_fresh_or_own_private_run_directory_is_used(shared):
    made = private_dir(shared / "a" / "b")
    assert made == shared / "a" / "b" and private(made) and private(made.parent)
    assert private_dir(made) == made  # found again: ours, 0700


# -- 3. state files ---------------------------------------------------------------------------

def test_the_state_is_readable_by_the_service_alone(procs, tmp_path):
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o755)
    state_dir.chmod(0o755)
    key = state_dir / "secret.key"  # an operator copied the key over with cp: 0644
    key.write_bytes(b"6Uq2ZJNIC0oTqXPZBSsN8DN1hI1O0RV3m9GzNEuxEwQ=\n")
    key.chmod(0o644)
    old_umask = os.umask(0o022)  # what a shell usually has
    try:
        subprocess.run([LABMETAL, "user", "set", "ada", "--password-stdin", "--state-dir",
                        str(state_dir)], input="Lovelace-1815\n", check=True,
                       capture_output=True, text=True)
        assert private(state_dir / "labmetal.db"), "the CLI made the database readable"
        url = f"http://127.0.0.1:{free_port()}"
        proc = procs.start([LABMETAL, "serve"], "modes",
                           service_env(state_dir=state_dir, listen=url.split("//")[1]))
    finally:
        os.umask(old_umask)
    proc.wait_for_output("listening on http://", timeout=60)
    assert f"{key} was readable by others (mode 0644); now 0600" in proc.output()
    ada = ("ada", "Lovelace-1815")
    image = requests.post(f"{url}/v1/images", json={"name": "k", "kind": "kernel"}, auth=ada,
                          timeout=30).json()
    kernel = os.urandom(4096)
    stored = requests.put(f"{url}/v1/images/{image['uuid']}/data", data=kernel, auth=ada,
                          timeout=30)
    assert stored.ok, stored.text
    # Seats still get the file: over HTTP, from the service, not from the disk.
    assert requests.get(stored.json()["file_url"], timeout=30).content == kernel
    loose = [f"{path} {stat.S_IMODE(os.lstat(path).st_mode):04o}"
             for path in [state_dir, *state_dir.rglob("*")] if not private(path)]
    assert not loose, loose


# -- 4. CHAP secrets on no command line ------------------------------------------------------

class CommandLineWatch:
    """Reads every process's command line, over and over, until stopped: what any local
    user can do."""

    def __init__(self, needle: str):
        self.needle = needle.encode()
        self.seen: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self.stop.is_set():
            for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
                try:
                    data = cmdline.read_bytes()
                except OSError:
                    continue
                if self.needle in data:
                    self.seen.append(data.replace(b"\0", b" ").decode(errors="replace"))

    def __enter__(self) -> CommandLineWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)


def test_a_chap_secret_is_on_no_command_line(tmp_path, monkeypatch):
    # Every tgtadm the exporter runs goes through this wrapper, which notes its arguments.
    wrappers = tmp_path / "bin"
    wrappers.mkdir()
    calls = tmp_path / "tgtadm-calls"
    tgtadm = shutil.which("tgtadm")
    assert tgtadm is not None
    (wrappers / "tgtadm").write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {calls}\n'
                                     f'exec {tgtadm} "$@"\n')
    (wrappers / "tgtadm").chmod(0o700)
    monkeypatch.setenv("PATH", f"{wrappers}:{os.environ['PATH']}")

    secret = "Seat-Secret-" + os.urandom(8).hex()
    chap = Chap("tp3-seat-07", secret)
    disk = tmp_path / "disk"
    with open(disk, "wb") as out:
        out.truncate(8 * MiB)
    exporter = TgtExporter(tmp_path / "tgt")
    try:
        with CommandLineWatch(secret) as watch:
            export = exporter.export(disk, "iqn.2024-09.org.labmetal:hostile", "127.0.0.1",
                                     free_port(), chap=chap)
        assert "--mode account --op bind" in calls.read_text()  # the wrapper was used
        assert secret not in calls.read_text()
        assert not watch.seen
        # The account is tgtd's all the same: the right secret logs in, a wrong one not.
        with pytest.raises(IscsiWriteError, match="wrong CHAP user or secret"):
            capture_over_iscsi(export.portal, export.iqn, 1, tmp_path / "wrong.raw",
                               chap=Chap(chap.user, "Not-The-Secret-1"))
        capture_over_iscsi(export.portal, export.iqn, 1, tmp_path / "copy.raw", chap=chap)
        assert (tmp_path / "copy.raw").stat().st_size == 8 * MiB
    finally:
        exporter.close()


# -- 5. uploads that grow --------------------------------------------------------------------

def compressed_qcow2(path: Path, virtual: int) -> Path:
    """A qcow2 whose every cluster is compressed, holding ``virtual`` bytes of a pattern:
    a few hundred KB standing for the whole virtual size of real data."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(virtual)],
                   check=True)
    step = 16 * MiB
    writes = [arg for offset in range(0, virtual, step)
              for arg in ("-c", f"write -c -P 0x5a {offset} {min(step, virtual - offset)}")]
    subprocess.run(["qemu-io", "-f", "qcow2", *writes, str(path)], check=True,
                   capture_output=True)
    return path


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB file system for the image store."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs",
                    str(mountpoint)], check=True)
    yield mountpoint
    subprocess.run(["umount", str(mountpoint)], check=True)


def ingest(store: ImageStore, path: Path, fmt: str | None = None) -> None:
    with open(path, "rb") as stream, store.receive(stream) as upload:
        store.add_disk_image(upload, fmt)


def nothing_left(store: ImageStore) -> bool:
    return not any((store.root / ".incoming").iterdir())


def test_a_compressed_qcow2_past_the_size_limit_is_refused_before_conversion(tmp_path):
    image = compressed_qcow2(tmp_path / "big.qcow2", 256 * MiB)
    store = ImageStore(tmp_path / "store", max_size=128 * MiB)
    with pytest.raises(ImageRejected, match=r"virtual size 268435456 bytes is over the "
                                            r"limit of 134217728 bytes \(max_image_size\)"):
        ingest(store, image, "qcow2")
    assert nothing_left(store)


def test_a_compressed_qcow2_bigger_than_the_free_space_is_refused_and_leaves_nothing(
        tmp_path, small_disk):
    image = compressed_qcow2(tmp_path / "bomb.qcow2", 256 * MiB)
    assert image.stat().st_size < 2 * MiB  # 256 MiB of raw from this
    store = ImageStore(small_disk / "images", max_size=64 * 1024 ** 3)
    with pytest.raises(StoreFull, match=r"raw form \(its virtual size\) needs 268435456 bytes"):
        ingest(store, image, "qcow2")
    assert nothing_left(store)
    usage = shutil.disk_usage(small_disk)
    assert usage.total - usage.free < MiB

    # Room for the raw form and (at worst as big as its data) the packed copy: accepted.
    fits = compressed_qcow2(tmp_path / "fits.qcow2", 16 * MiB)
    ingest(store, fits, "qcow2")


def test_a_raw_upload_whose_packed_copy_cannot_fit_is_refused_clearly(tmp_path, small_disk):
    raw = tmp_path / "random.raw"
    raw.write_bytes(os.urandom(40 * MiB))  # incompressible: the packed copy is as big
    store = ImageStore(small_disk / "images", max_size=64 * 1024 ** 3)
    with pytest.raises(StoreFull, match="the image's packed copy needs"):
        ingest(store, raw, "raw")
    assert nothing_left(store)
    usage = shutil.disk_usage(small_disk)
    assert usage.total - usage.free < MiB
