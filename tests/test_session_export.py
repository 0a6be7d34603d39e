"""A teacher exports a class's sessions (issue 7): a session's disk, or one of its save
points, downloaded as a standalone image (qcow2 or raw) through the API, the CLI and its
class export, on both stores (``local`` and ``ceph``). The lab, the service and the single-
node Ceph are tests/test_sessions.py's (``lab``); the backend story uses
tests/test_overlays.py's stores. A seat writes known bytes over iSCSI first; the downloaded
image must hold the template with exactly those bytes, and no backing file.

A session in use on a seat is refused (409 / ``Reason.BUSY``): the seat could write it
during the copy.
"""
from __future__ import annotations

import json
import os
import subprocess
from datetime import date
from pathlib import Path
from typing import Any

import pytest
import requests

from labmetal.images.overlays.base import OverlayError, Reason
from tests.iscsi_seat import storage_tools  # noqa: F401 (autouse fixture)
from labmetal.lab.harness import LABMETAL, error_text, wait_for
from tests.test_overlays import raw_template, seat_for, store, stores  # noqa: F401 (fixtures)
from tests.test_sessions import (PASSWORDS, TEMPLATE_BYTE, Lab, auth,  # noqa: F401 (fixtures)
                                 ceph_cluster, lab, make_lab)

MiB = 2**20


# -- what an exported disk must be -------------------------------------------------------
def expected_disk(path: Path, writes: list[tuple[int, int, int]], size: int) -> Path:
    """The template (TEMPLATE_BYTE in its first 8 MiB, zeros after) with ``writes``
    (byte, offset, length) made over it, as a raw file."""
    with open(path, "wb") as disk:
        disk.write(bytes([TEMPLATE_BYTE]) * 8 * MiB)
        disk.truncate(size)
        for byte, offset, length in writes:
            disk.seek(offset)
            disk.write(bytes([byte]) * length)
    return path


def holds(image: Path, fmt: str, expected: Path) -> bool:
    """The image's content equals the expected raw disk (same size, same bytes)."""
    compared = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", fmt,
                               str(expected), str(image)], capture_output=True, text=True)
    assert compared.returncode in (0, 1), compared.stderr
    return compared.returncode == 0


def standalone(image: Path, fmt: str) -> dict[str, Any]:
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-f", fmt,
                                      str(image)], capture_output=True, text=True,
                                     check=True).stdout)
    assert info["format"] == fmt
    assert "backing-filename" not in info and "full-backing-filename" not in info, info
    return info


# -- the backends ------------------------------------------------------------------------
def test_a_stopped_session_or_a_save_point_is_copied_whole_a_served_one_is_not(store,
                                                                                tmp_path):
    backend = store.backend
    backend.make_template("tp8", 1, raw_template(tmp_path / "tp8.raw"))
    backend.create_session("kai-tp8", "tp8", 1)
    seat = seat_for(store, "kai-tp8", "h01")
    seat.write(0xA1, 0, MiB)
    first = backend.save("kai-tp8", "step 1: a+b")  # ':' and '+': qemu's option syntaxes
    seat.write(0xB2, 0, MiB)
    seat.write(0xB3, 40 * MiB, MiB)

    with pytest.raises(OverlayError, match="exported to a seat, which could write it "
                       "during the copy: unexport it first") as busy:
        backend.export_disk("kai-tp8", tmp_path / "busy.qcow2")
    assert busy.value.reason is Reason.BUSY
    assert not (tmp_path / "busy.qcow2").exists()
    backend.unexport("kai-tp8")

    head = tmp_path / "head.qcow2"
    assert backend.export_disk("kai-tp8", head) == head.stat().st_size
    assert standalone(head, "qcow2")["virtual-size"] == 64 * MiB
    now = expected_disk(tmp_path / "now.raw", [(0xB2, 0, MiB), (0xB3, 40 * MiB, MiB)],
                        64 * MiB)
    assert holds(head, "qcow2", now)
    assert head.stat().st_size < 16 * MiB  # sparse: the data, not the disk's size

    at_save = tmp_path / "save1.raw"
    backend.export_disk("kai-tp8", at_save, "raw", first.save_id)
    assert at_save.stat().st_size == 64 * MiB
    assert holds(at_save, "raw", expected_disk(tmp_path / "then.raw", [(0xA1, 0, MiB)],
                                               64 * MiB))
    small = tmp_path / "small.qcow2"
    backend.export_disk("kai-tp8", small, compress=True)
    assert holds(small, "qcow2", now) and small.stat().st_size < head.stat().st_size / 4

    for args, reason, words in (
            (("vmdk",), Reason.INVALID, "disk format 'vmdk': qcow2 or raw"),
            (("raw", None, True), Reason.INVALID, "only a qcow2 copy can be compressed"),
            (("qcow2", "save.9.nope"), Reason.NOT_FOUND, "no save point save.9.nope")):
        with pytest.raises(OverlayError, match=words) as refused:
            backend.export_disk("kai-tp8", tmp_path / "refused", *args)
        assert refused.value.reason is reason
    with pytest.raises(OverlayError, match="no session nobody") as missing:
        backend.export_disk("nobody", tmp_path / "refused")
    assert missing.value.reason is Reason.NOT_FOUND
    assert not (tmp_path / "refused").exists()

    # the copies took nothing from the session: its saves and data as they were
    assert backend.list_saves("kai-tp8") == [first]
    seat = seat_for(store, "kai-tp8", "h01")
    assert seat.holds(0xB2, 0, MiB) and seat.holds(0xB3, 40 * MiB, MiB)


# -- the API -----------------------------------------------------------------------------
def download(lab: Lab, user: str, path: str, **params: str) -> requests.Response:
    return requests.get(f"{lab.service.url}{path}/disk", params=params, auth=auth(user),
                        timeout=120)


def export_files(pid: int) -> list[str]:
    """The exported files the service process still has open (unlinked already)."""
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if "/.exports/" in target:
            found.append(target)
    return found


def test_a_teacher_downloads_a_stopped_students_disk_or_one_of_its_save_points(lab):
    lab.ok("tom", "POST", "/v1/templates", {"name": "tp3-reseaux", "image": "tp3-v1"},
           status=201)
    ses = lab.ok("sam", "POST", "/v1/sessions", {"template": "tp3-reseaux"}, status=201)
    path = f"/v1/sessions/{ses['uuid']}"
    seat = lab.seat(lab.ok("sam", "POST", f"{path}/start", {"seat": "a01"}), "a01")
    seat.write(0xA1, 0, MiB)
    lab.ok("sam", "POST", f"{path}/save", {"label": "exercise 1"}, status=201)
    seat.write(0xB2, 0, MiB)
    seat.write(0xB3, 20 * MiB, MiB)

    # in use on a seat: refused, saying what to do
    for params in ({}, {"save": "exercise 1"}):
        busy = download(lab, "tom", path, **params)
        assert busy.status_code == 409, busy.text
        assert "running on seat a01 and cannot be exported; stop it first" in \
            error_text(busy)
    lab.ok("sam", "POST", f"{path}/stop")

    # another student gets nothing of it, as for every other session action
    for params in ({}, {"save": "1"}, {"format": "raw"}):
        assert download(lab, "una", path, **params).status_code == 403

    # the teacher: the disk as it is now, a standalone qcow2
    today = date.today().isoformat()
    now = download(lab, "tom", path)
    assert now.status_code == 200, now.text
    assert now.headers["Content-Disposition"] == \
        f"attachment; filename=tp3-reseaux-sam-{today}.qcow2"
    assert int(now.headers["Content-Length"]) == len(now.content)
    image = lab.work / "sam-now.qcow2"
    image.write_bytes(now.content)
    assert standalone(image, "qcow2")["virtual-size"] == 32 * MiB
    assert holds(image, "qcow2", expected_disk(lab.work / "now.raw",
                                               [(0xB2, 0, MiB), (0xB3, 20 * MiB, MiB)],
                                               32 * MiB))

    # the owner: a save point, by label, as raw
    then = download(lab, "sam", path, format="raw", save="exercise 1")
    assert then.status_code == 200, then.text
    assert then.headers["Content-Disposition"] == \
        f"attachment; filename=tp3-reseaux-sam-{today}-save1.raw"
    raw = lab.work / "sam-save1.raw"
    raw.write_bytes(then.content)
    assert holds(raw, "raw", expected_disk(lab.work / "then.raw", [(0xA1, 0, MiB)], 32 * MiB))

    # what is asked for wrong
    for params, status, words in (({"format": "vmdk"}, 400, "Unknown format 'vmdk'"),
                                  ({"format": "raw", "compress": "true"}, 400,
                                   "Only a qcow2 copy can be compressed"),
                                  ({"save": "nope"}, 404, "has no save point nope"),
                                  ({"save": "2"}, 404, "has no save point 2")):
        refused = download(lab, "tom", path, **params)
        assert refused.status_code == status, refused.text
        assert words in error_text(refused)
    assert download(lab, "tom", "/v1/sessions/00000000-0000-4000-8000-000000000000") \
        .status_code == 404

    # a download given up half-way: the service closes (so frees) the file all the same
    exports = lab.service.state_dir / "overlays" / ".exports"
    pid = lab.service.proc.pid
    with requests.get(f"{lab.service.url}{path}/disk", params={"format": "raw"},
                      auth=auth("tom"), stream=True, timeout=120) as partial:
        assert partial.status_code == 200
        next(partial.iter_content(64 * 1024))
        assert list(exports.iterdir()) == []  # unlinked before the first byte went out
        assert export_files(pid), "the streamed file should be open while it is sent"
    wait_for(lambda: not export_files(pid), 30, "the service to close the abandoned export")
    assert list(exports.iterdir()) == []


# -- the CLI -----------------------------------------------------------------------------
def cli(lab: Lab, user: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LABMETAL_URL": lab.service.url, "LABMETAL_USER": user,
           "LABMETAL_PASSWORD": PASSWORDS[user]}
    return subprocess.run([LABMETAL, *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_cli_exports_a_class_one_file_per_student_skipping_those_in_use(lab):
    lab.ok("tom", "POST", "/v1/templates", {"name": "tp4", "image": "tp3-v1"}, status=201)
    sessions = {student: lab.ok("ada", "POST", "/v1/sessions",
                                {"template": "tp4", "student": student}, status=201)
                for student in ("sam", "una")}
    written = {"sam": 0x5A, "una": 0x6B}
    for student, seat_name in (("sam", "a01"), ("una", "a02")):
        path = f"/v1/sessions/{sessions[student]['uuid']}"
        seat = lab.seat(lab.ok(student, "POST", f"{path}/start", {"seat": seat_name}),
                        seat_name)
        seat.write(written[student], 2 * MiB, MiB)
    lab.ok("sam", "POST", f"/v1/sessions/{sessions['sam']['uuid']}/stop")

    # una still works on seat a02: skipped, with a line saying so
    class_dir = lab.work / "class-tp4"
    first = cli(lab, "tom", "template", "export", "tp4", "--dir", str(class_dir))
    assert first.returncode == 0, first.stderr
    assert f"skipped una: session {sessions['una']['uuid']} is running on seat a02; " \
        "stop it, then export it again" in first.stdout
    assert "template tp4: 1 of 2 session(s) exported" in first.stdout
    assert "1 skipped (in use on a seat), 0 failed" in first.stdout
    assert sorted(os.listdir(class_dir)) == ["sam.qcow2"]

    lab.ok("una", "POST", f"/v1/sessions/{sessions['una']['uuid']}/stop")
    again = cli(lab, "tom", "template", "export", "tp4", "--dir", str(class_dir), "--json")
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert [e["student"] for e in summary["exported"]] == ["sam", "una"]
    assert summary["skipped"] == [] and summary["failed"] == []
    assert "downloaded sam" in again.stderr  # the progress, on stderr
    assert sorted(os.listdir(class_dir)) == ["sam.qcow2", "una.qcow2"]
    for student, byte in written.items():
        image = class_dir / f"{student}.qcow2"
        standalone(image, "qcow2")
        assert holds(image, "qcow2", expected_disk(lab.work / f"{student}.raw",
                                                   [(byte, 2 * MiB, MiB)], 32 * MiB))

    # one session: a student's own, by its template's name; not another's
    mine = lab.work / "mine.raw"
    own = cli(lab, "sam", "session", "export", "tp4", "--format", "raw", "-o", str(mine))
    assert own.returncode == 0, own.stderr
    assert f"written to {mine}" in own.stdout and "downloaded tp4 of sam" in own.stderr
    assert holds(mine, "raw", lab.work / "sam.raw")
    refused = cli(lab, "sam", "session", "export", sessions["una"]["uuid"], "-o",
                  str(lab.work / "theirs.qcow2"))
    assert refused.returncode == 1 and "disallowed by policy" in refused.stderr
    assert not (lab.work / "theirs.qcow2").exists()
    assert not list(lab.work.glob("*.part"))
