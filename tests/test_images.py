"""An admin registers images: real ext4 disks made with mkfs.ext4 and qemu-img, uploaded
through the API and the `labmetal images` CLI, fetched back chunk by chunk as a seat does;
unsafe or broken images are refused, each with its reason, and leave nothing behind."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pty
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from labmetal.agent.manifest import Manifest, unpack_chunk
from labmetal.lab.harness import LABMETAL, error_text, start_service

MiB = 1024 * 1024
MAX_IMAGE_SIZE = 40 * MiB
DISK_SIZE = 24 * MiB


@dataclass(frozen=True)
class Disk:
    raw: Path
    qcow2: Path
    raw_sha256: str  # of what `qemu-img convert -O raw` makes of the qcow2


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def disk(tmp_path_factory) -> Disk:
    """An ext4 file system holding real files (source text, random data, a tree)."""
    work = tmp_path_factory.mktemp("disk")
    content = work / "content"
    shutil.copytree(Path(__file__).parent.parent / "labmetal", content / "src" / "labmetal",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (content / "data").mkdir()
    (content / "data" / "random.bin").write_bytes(os.urandom(3 * MiB))
    (content / "etc").mkdir()
    (content / "etc" / "motd").write_text("Welcome to TP3: networks\n" * 100)
    raw = work / "disk.raw"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(content), "-L", "tp3", str(raw),
                    str(DISK_SIZE // 1024)], check=True, capture_output=True, timeout=60)
    qcow2 = work / "disk.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2))
    converted = work / "converted.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", str(qcow2), str(converted))
    disk = Disk(raw, qcow2, sha256_of(converted))
    converted.unlink()
    return disk


@pytest.fixture
def service(procs):
    return start_service(procs, "images", max_image_size=MAX_IMAGE_SIZE)


def register(service, name: str, kind: str = "whole-disk", **fields) -> dict:
    response = service.post("/v1/images", {"name": name, "kind": kind, **fields})
    assert response.status_code == 201, response.text
    return response.json()


def upload(service, ident: str, data, timeout: float = 60) -> requests.Response:
    url = f"{service.url}/v1/images/{ident}/data"
    if isinstance(data, Path):
        with open(data, "rb") as body:
            return requests.put(url, data=body, timeout=timeout)
    return requests.put(url, data=data, timeout=timeout)


def store_dir(service) -> Path:
    return service.state_dir / "images"


def store_is_empty_but(service, *uuids: str) -> bool:
    """Only the given images' directories, and no work directory left over."""
    store = store_dir(service)
    present = {p.name for p in store.iterdir()} if store.exists() else set()
    incoming = store / ".incoming"
    return present - {".incoming"} == set(uuids) and not (
        incoming.exists() and any(incoming.iterdir()))


def test_admin_uploads_raw_and_qcow2_images_and_a_seat_fetches_verified_chunks(service, disk):
    raw_sha256 = sha256_of(disk.raw)
    assert raw_sha256 == disk.raw_sha256  # the conversions lose nothing
    created = register(service, "tp3-raw", sha256=raw_sha256, description="TP3, raw")
    assert created["status"] == "queued" and created["raw_url"] is None
    assert created["links"][0]["href"] == f"{service.url}/v1/images/{created['uuid']}"

    response = upload(service, "tp3-raw", disk.raw)
    assert response.status_code == 200, response.text
    raw_image = response.json()
    assert raw_image["status"] == "active" and raw_image["disk_format"] == "raw"
    assert raw_image["size"] == raw_image["virtual_size"] == DISK_SIZE
    assert raw_image["sha256"] == raw_image["raw_sha256"] == raw_sha256
    assert raw_image["chunk_count"] == DISK_SIZE // raw_image["chunk_size"]

    register(service, "tp3", disk_format="qcow2")
    response = upload(service, "tp3", disk.qcow2)
    assert response.status_code == 200, response.text
    image = response.json()
    assert image["disk_format"] == "qcow2" and image["size"] == disk.qcow2.stat().st_size
    assert image["sha256"] == sha256_of(disk.qcow2)
    assert image["virtual_size"] == DISK_SIZE and image["raw_sha256"] == disk.raw_sha256
    assert image["packed_size"] < DISK_SIZE
    assert upload(service, "tp3", disk.qcow2).status_code == 409  # data is set once

    # Stored once, as a sparse raw file; the qcow2 upload itself is not kept.
    stored = store_dir(service) / image["uuid"]
    assert sorted(p.name for p in stored.iterdir()) == ["manifest.json", "packed", "raw"]
    assert (stored / "raw").stat().st_blocks * 512 < DISK_SIZE
    assert store_is_empty_but(service, image["uuid"], raw_image["uuid"])

    manifest = Manifest.from_json(service.get("/v1/images/tp3/manifest").content)
    assert manifest.raw_sha256 == disk.raw_sha256 and manifest.raw_size == DISK_SIZE
    assert requests.get(image["manifest_url"], timeout=30).json() == json.loads(
        service.get(f"/v1/images/{image['uuid']}/manifest").content)

    # A seat fetches each chunk with a Range request and verifies it on its own.
    original = disk.raw.read_bytes()
    assert manifest.data_chunks
    for chunk in manifest.data_chunks:
        end = chunk.packed_offset + chunk.packed_length - 1
        response = requests.get(image["packed_url"], timeout=30,
                                headers={"Range": f"bytes={chunk.packed_offset}-{end}"})
        assert response.status_code == 206
        assert len(response.content) == chunk.packed_length
        assert unpack_chunk(chunk, response.content) == original[chunk.offset:
                                                                 chunk.offset + chunk.length]
    last = manifest.chunks[-1]
    response = requests.get(image["raw_url"], timeout=30,
                            headers={"Range": f"bytes={last.offset}-{last.offset + 99}"})
    assert response.status_code == 206 and response.content == original[last.offset:
                                                                        last.offset + 100]
    assert requests.get(image["packed_url"], timeout=30).content == (
        stored / "packed").read_bytes()

    listed = service.get("/v1/images?limit=1").json()
    assert [i["name"] for i in listed["images"]] == ["tp3-raw"]
    following = service.get(listed["next"].removeprefix(service.url)).json()
    assert [i["name"] for i in following["images"]] == ["tp3"]
    assert service.get("/v1/images?kind=kernel").json() == {"images": []}
    assert service.get("/v1/images?kind=iso").status_code == 400


def test_unsafe_and_broken_images_are_refused_and_leave_nothing_behind(service, disk, tmp_path):
    trap = tmp_path / "trap"
    os.mkfifo(trap)  # opening it for reading would block: qemu-img would hang on it
    qemu_img("create", "-f", "qcow2", "-u", "-b", str(trap), "-F", "raw",
             str(tmp_path / "fifo-backed.qcow2"), "1M")
    qemu_img("create", "-f", "qcow2", "-b", "/etc/hostname", "-F", "raw",
             str(tmp_path / "host-backed.qcow2"))
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={tmp_path / 'data.raw'}",
             str(tmp_path / "external.qcow2"), "1M")
    qemu_img("create", "-f", "qcow2", str(tmp_path / "huge.qcow2"), "1G")
    corrupt = tmp_path / "truncated.qcow2"
    corrupt.write_bytes(disk.qcow2.read_bytes()[:disk.qcow2.stat().st_size // 2])
    for fmt in ("vmdk", "vhdx", "vdi", "qed"):
        qemu_img("create", "-f", fmt, str(tmp_path / f"disk.{fmt}"), "1M")

    cases = [
        ("fifo-backed.qcow2", {}, f"qcow2 image has a backing file ('{trap}')"),
        ("host-backed.qcow2", {"disk_format": "qcow2"},
         "qcow2 image has a backing file ('/etc/hostname')"),
        ("external.qcow2", {}, "qcow2 image has an external data file"),
        ("huge.qcow2", {}, f"virtual size 1073741824 bytes is over the limit of "
                           f"{MAX_IMAGE_SIZE} bytes"),
        ("truncated.qcow2", {}, "corrupt qcow2: qemu-img check finds"),
        ("disk.vmdk", {}, "the file is a VMDK image; labmetal accepts raw and qcow2 only"),
        ("disk.vhdx", {}, "the file is a VHDX image"),
        ("disk.vdi", {}, "the file is a VDI image"),
        ("disk.qed", {}, "the file is a QED image"),
        (disk.raw, {"disk_format": "qcow2"}, "declared qcow2 but the file is raw"),
        (disk.qcow2, {"disk_format": "raw"}, "declared raw but the file is qcow2"),
        (disk.raw, {"sha256": "0" * 64}, f"sha256 mismatch: expected {'0' * 64}, the upload "
                                         f"is {sha256_of(disk.raw)}"),
    ]
    for number, (file, fields, reason) in enumerate(cases):
        name = f"bad-{number}"
        register(service, name, **fields)
        response = upload(service, name, tmp_path / file, timeout=20)
        assert response.status_code == 400, (file, response.text)
        assert error_text(response).startswith(f"Image {name} rejected: {reason}"), (
            file, error_text(response))
        assert service.get(f"/v1/images/{name}").json()["status"] == "queued"
        assert store_is_empty_but(service)

    with pytest.raises(OSError) as no_reader:  # nobody holds the trap open either
        os.close(os.open(trap, os.O_WRONLY | os.O_NONBLOCK))
    assert no_reader.value.errno == errno.ENXIO

    # A refused upload can be followed by a good one.
    response = upload(service, "bad-5", disk.qcow2)
    assert response.status_code == 200 and response.json()["status"] == "active"


def test_uploads_past_the_size_limit_are_refused_with_413(service):
    register(service, "too-big")

    def pieces():  # no Content-Length: the limit is found while reading
        for _ in range(MAX_IMAGE_SIZE // MiB + 1):
            yield bytes(MiB)

    for body in (bytes(MAX_IMAGE_SIZE + 1), pieces()):
        response = upload(service, "too-big", body)
        assert response.status_code == 413, response.text
        assert error_text(response) == (f"Image too-big rejected: the upload is larger than "
                                        f"the limit of {MAX_IMAGE_SIZE} bytes (max_image_size)")
        assert store_is_empty_but(service)
    assert service.get("/v1/images/too-big").json()["status"] == "queued"
    empty = upload(service, "too-big", b"")
    assert empty.status_code == 400 and "the upload is empty" in error_text(empty)


def test_registration_input_is_checked_with_the_field_named(service):
    response = service.post("/v1/images", {"name": "x", "kind": "iso"})
    assert response.status_code == 400
    assert error_text(response) == ("Unknown kind 'iso'; kinds: whole-disk, partition, kernel, "
                                    "ramdisk (field: kind)")
    response = service.post("/v1/images", {"name": "x", "kind": "whole-disk",
                                           "disk_format": "vmdk"})
    assert response.status_code == 400 and "accepted: raw, qcow2" in error_text(response)
    response = service.post("/v1/images", {"name": "x", "kind": "whole-disk", "sha256": "abc"})
    assert response.status_code == 400 and "(field: sha256)" in error_text(response)
    response = service.post("/v1/images", {"name": "x y", "kind": "kernel"})
    assert response.status_code == 400 and "(field: name)" in error_text(response)
    response = service.post("/v1/images", {"name": "x", "kind": "kernel", "path": "/etc"})
    assert response.status_code == 400 and "Unknown attribute(s)" in error_text(response)

    register(service, "vmlinuz", "kernel")
    response = service.post("/v1/images", {"name": "vmlinuz", "kind": "kernel"})
    assert response.status_code == 409
    assert error_text(response) == "An image with name vmlinuz already exists (field: name)."

    response = service.post("/v1/images", {"name": "root", "kind": "partition"})
    assert response.status_code == 400
    assert error_text(response) == ("A partition image needs a kernel: the name or UUID of an "
                                    "active kernel image (field: kernel)")
    response = service.post("/v1/images", {"name": "root", "kind": "partition",
                                           "kernel": "vmlinuz", "ramdisk": "vmlinuz"})
    assert response.status_code == 400
    assert "Kernel image vmlinuz has no data yet (status queued)" in error_text(response)
    assert upload(service, "vmlinuz", b"MZ kernel bytes").status_code == 200
    response = service.post("/v1/images", {"name": "root", "kind": "partition",
                                           "kernel": "vmlinuz", "ramdisk": "vmlinuz"})
    assert response.status_code == 400
    assert error_text(response) == ("Image vmlinuz is a kernel image, not a ramdisk "
                                    "(field: ramdisk)")
    response = service.post("/v1/images", {"name": "disk", "kind": "whole-disk",
                                           "kernel": "vmlinuz"})
    assert response.status_code == 400
    assert error_text(response) == "Only partition images link a kernel (field: kernel)"
    missing = service.get("/v1/images/nope")
    assert missing.status_code == 404 and error_text(missing) == "Image nope could not be found."


def test_images_in_use_cannot_be_deleted(service, disk):
    kernel = register(service, "deploy-kernel", "kernel")
    assert upload(service, "deploy-kernel", b"kernel").status_code == 200
    initrd = register(service, "deploy-initrd", "ramdisk")
    assert upload(service, "deploy-initrd", b"initrd").status_code == 200
    root = register(service, "tp3-root", "partition", kernel="deploy-kernel",
                    ramdisk=initrd["uuid"])  # by name or by UUID
    assert (root["kernel"], root["ramdisk"]) == (kernel["uuid"], initrd["uuid"])
    assert upload(service, "tp3-root", disk.raw).status_code == 200
    node = service.post("/v1/nodes", {"driver": "wol", "name": "pc1",
                                      "instance_info": {"image_source": root["uuid"]},
                                      "driver_info": {"deploy_kernel": "deploy-kernel"}})
    assert node.status_code == 201, node.text

    refused = service.delete("/v1/images/tp3-root")
    assert refused.status_code == 409
    assert error_text(refused) == ("Image tp3-root is in use by node pc1 "
                                   "(instance_info.image_source); it cannot be deleted.")
    refused = service.delete("/v1/images/deploy-kernel")
    assert refused.status_code == 409
    assert error_text(refused) == ("Image deploy-kernel is in use by node pc1 "
                                   "(driver_info.deploy_kernel), partition image tp3-root "
                                   "(kernel); it cannot be deleted.")

    assert service.delete("/v1/nodes/pc1").status_code == 204
    assert service.delete("/v1/images/tp3-root").status_code == 204
    assert service.get("/v1/images/tp3-root").status_code == 404
    assert requests.get(f"{service.url}/files/images/{root['uuid']}/raw",
                        timeout=30).status_code == 404
    assert service.delete("/v1/images/deploy-kernel").status_code == 204
    assert service.delete("/v1/images/deploy-initrd").status_code == 204
    assert store_is_empty_but(service)


def images_cli(service, *args: str, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess:
    return subprocess.run([LABMETAL, "images", *args], capture_output=True, text=True,
                          env={**os.environ, "LABMETAL_URL": service.url, **(env or {})},
                          timeout=120)


def test_admin_manages_images_with_the_cli_behind_http_basic(procs, disk, tmp_path):
    state_dir = tmp_path / "cli-state"
    subprocess.run([LABMETAL, "user", "set", "alice", "--password-stdin", "--state-dir",
                    str(state_dir)], input="correct horse\n", check=True, capture_output=True,
                   text=True)
    service = start_service(procs, "images-cli", auth="http_basic", state_dir=state_dir,
                            max_image_size=MAX_IMAGE_SIZE)
    alice = {"LABMETAL_USER": "alice", "LABMETAL_PASSWORD": "correct horse"}
    kernel_file, initrd_file = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    kernel_file.write_bytes(os.urandom(300_000))
    initrd_file.write_bytes(os.urandom(700_000))

    result = images_cli(service, "upload", "vmlinuz", str(kernel_file), "--kind", "kernel",
                        "--json", env=alice)
    assert result.returncode == 0, result.stderr
    kernel = json.loads(result.stdout)
    assert kernel["status"] == "active" and kernel["sha256"] == sha256_of(kernel_file)
    assert result.stderr.startswith("uploaded vmlinuz: 0.3 MB in ")  # not a TTY: one line
    result = images_cli(service, "upload", "initrd", str(initrd_file), "--kind", "ramdisk",
                        "--sha256", sha256_of(initrd_file), env=alice)
    assert result.returncode == 0, result.stderr
    assert "file_url" in result.stdout and "active" in result.stdout

    # On a terminal, a progress bar with the rate.
    controller, terminal = pty.openpty()
    try:
        upload = subprocess.Popen([LABMETAL, "images", "upload", "tp3-root", str(disk.qcow2),
                                   "--kind", "partition", "--format", "qcow2", "--kernel",
                                   "vmlinuz", "--ramdisk", "initrd", "--json"],
                                  stdout=subprocess.PIPE, stderr=terminal, text=True,
                                  env={**os.environ, "LABMETAL_URL": service.url, **alice})
        os.close(terminal)
        output, _ = upload.communicate(timeout=120)
        shown = b""
        while True:
            try:
                shown += os.read(controller, 4096)
            except OSError:  # EIO: the terminal's last writer has gone
                break
    finally:
        os.close(controller)
    assert upload.returncode == 0, shown
    assert b"upload tp3-root: 100.0%" in shown and b"MB/s" in shown
    root = json.loads(output)
    assert (root["kind"], root["kernel"], root["raw_sha256"]) == (
        "partition", kernel["uuid"], disk.raw_sha256)

    listed = images_cli(service, "list", env=alice)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["NAME", "KIND", "STATUS", "FORMAT", "SIZE", "VIRTUAL", "UUID"]
    assert lines[3].split()[:4] == ["tp3-root", "partition", "active", "qcow2"]
    assert "25.2 MB" in lines[3]  # its virtual size, 24 MiB
    kinds = json.loads(images_cli(service, "list", "--kind", "kernel", "--json",
                                  env=alice).stdout)
    assert [image["name"] for image in kinds] == ["vmlinuz"]
    shown_root = images_cli(service, "show", "tp3-root", env=alice).stdout
    assert f"raw_sha256    {disk.raw_sha256}" in shown_root

    # Seats download without credentials; the registry needs them.
    assert requests.get(root["packed_url"], timeout=30).status_code == 200
    assert requests.get(f"{service.url}/v1/images", timeout=30).status_code == 401

    refused = images_cli(service, "delete", "vmlinuz", env=alice)
    assert refused.returncode == 1
    assert refused.stderr.strip() == ("labmetal images delete: Image vmlinuz is in use by "
                                      "partition image tp3-root (kernel); it cannot be deleted.")
    bad = tmp_path / "disk.vmdk"
    qemu_img("create", "-f", "vmdk", str(bad), "1M")
    refused = images_cli(service, "upload", "tp4", str(bad), "--kind", "whole-disk", env=alice)
    assert refused.returncode == 1
    assert "Image tp4 rejected: the file is a VMDK image" in refused.stderr
    anonymous = images_cli(service, "list")
    assert anonymous.returncode == 1 and "Authentication required" in anonymous.stderr
    # The refused upload's record is gone, so the same name can be used again.
    assert images_cli(service, "show", "tp4", env=alice).returncode == 1
    for name in ("tp3-root", "vmlinuz", "initrd"):
        deleted = images_cli(service, "delete", name, env=alice)
        assert deleted.returncode == 0, deleted.stderr
    assert json.loads(images_cli(service, "list", "--json", env=alice).stdout) == []
    assert "correct horse" not in (procs.workdir / "images-cli.service.log").read_text()
