"""The deploy agent as a real process on a light seat (a disk file), driven over its command API.

Images are real (ext4 built with mkfs.ext4 -d, a whole-disk image with a partition table),
served over real HTTP with Range support; lookup and heartbeats go to a small stand-in for
labmetal's agent endpoints that records what it is sent. Checks use tools other than the
agent's own code where there is one (parted, blkid, debugfs, e2fsck, losetup).

Light seats run the agent from the checkout; the same commands from the built ramdisk, on
PCs' firmware and drivers, are proven by tests/test_lab_boots.py (BIOS: whole-disk,
partition, iscsi, WoL, self-registration) and tests/test_firmware_boots.py (Secure Boot
and UEFI seats, a multicast room job, a delta re-image).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from labmetal.agent.bootloader import SIGNED_LOADERS
from labmetal.agent import proof
from labmetal.agent.manifest import Manifest, build
from labmetal.lab.harness import Processes, free_port, wait_for

MIB = 1024 * 1024
CHUNK = MIB
TOKEN = "agent-tok-5d1e9b7c"  # distinctive, so a leak into the agent's log is found
NODE = "5b0c3c34-8d5e-4b1f-9d59-0a6f1f1d0b77"
MBR_BIN = Path("/usr/lib/syslinux/mbr/mbr.bin")
TOOLS = {"parted": "parted", "mkfs.ext4": "e2fsprogs", "debugfs": "e2fsprogs",
         "e2fsck": "e2fsprogs", "extlinux": "extlinux", "losetup": "util-linux",
         "wipefs": "util-linux", "blkid": "util-linux", "partx": "util-linux", "tgtd": "tgt"}


@pytest.fixture(scope="module", autouse=True)
def seat_tools():
    missing = sorted({package for tool, package in TOOLS.items() if shutil.which(tool) is None}
                     | ({"syslinux-common"} if not MBR_BIN.exists() else set()))
    if missing:
        pytest.fail(f"the agent's tests need these Debian packages: {' '.join(missing)}")
    if os.geteuid() != 0:
        pytest.fail("the agent's tests need root (loop devices, mount)")


# ---------------------------------------------------------------- images

@dataclass(frozen=True)
class Image:
    raw: bytes
    manifest: Manifest
    packed: bytes


def make_image(raw_path: Path) -> Image:
    manifest = build(raw_path, raw_path.with_suffix(".packed"), chunk_size=CHUNK)
    return Image(raw_path.read_bytes(), manifest, raw_path.with_suffix(".packed").read_bytes())


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Image]:
    """A root filesystem image (ext4 with real files) and a whole-disk image holding it."""
    work = tmp_path_factory.mktemp("images")
    tree = work / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/hostname").write_text("tp-reseaux\n")
    shutil.copy("/etc/os-release", tree / "etc/os-release")
    (tree / "usr/bin").mkdir(parents=True)
    shutil.copy(sys.executable, tree / "usr/bin/python3")
    (tree / "srv").mkdir()
    (tree / "srv/course.bin").write_bytes(os.urandom(3 * MIB))
    rootfs = work / "rootfs.img"
    subprocess.run(["mkfs.ext4", "-q", "-L", "labroot", "-d", str(tree), str(rootfs), "24M"],
                   check=True)
    disk = work / "disk.img"
    with open(disk, "wb") as out:
        out.truncate(40 * MIB)
    subprocess.run(["parted", "-s", str(disk), "mklabel", "msdos", "mkpart", "primary", "ext4",
                    "1MiB", "25MiB"], check=True, capture_output=True)
    with open(disk, "r+b") as out:
        out.seek(MIB)
        out.write(rootfs.read_bytes())
    # A Debian-like UEFI root: the signed shim and GRUB where shim-signed and
    # grub-efi-amd64-signed install them (these bytes stand in for them: the test checks
    # they reach the EFI system partition; test_firmware_boots boots real ones).
    for name, path in SIGNED_LOADERS.items():
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        (tree / path).write_bytes(f"{name} of the image\n".encode() + os.urandom(4096))
    uefi_rootfs = work / "uefi-rootfs.img"
    subprocess.run(["mkfs.ext4", "-q", "-L", "labroot", "-d", str(tree), str(uefi_rootfs),
                    "24M"], check=True)
    return {"rootfs": make_image(rootfs), "disk": make_image(disk),
            "uefi-rootfs": make_image(uefi_rootfs),
            "loaders": {name: (tree / path).read_bytes() for name, path in SIGNED_LOADERS.items()}}


# ---------------------------------------------------------------- peers

class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, handler: type, owner: Any) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.owner = owner
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def json_body(self) -> Any:
        return json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))

    def log_message(self, *args: Any) -> None:
        pass


@dataclass
class FileServer:
    """Static files with Range support, and the faults the agent must survive or report."""
    url: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    corrupt: dict[str, int] = field(default_factory=dict)  # path -> offset of a flipped byte
    drop_after: dict[str, int] = field(default_factory=dict)  # path -> bytes, once
    hold: threading.Event | None = None  # packed bodies wait for it
    outage: float = 0.0  # seconds of 503 after a drop: labmetal restarting behind its front
    unavailable_until: float = 0.0
    unavailable_answers: int = 0

    def serve(self, name: str, image: Image) -> dict[str, str]:
        self.files[f"/{name}/manifest.json"] = image.manifest.to_json().encode()
        self.files[f"/{name}/packed"] = image.packed
        return {"manifest_url": f"{self.url}/{name}/manifest.json",
                "packed_url": f"{self.url}/{name}/packed"}


class _FileHandler(_Handler):
    def do_GET(self) -> None:
        files: FileServer = self.server.owner
        files.requests.append((self.path, self.headers.get("Range")))
        if time.monotonic() < files.unavailable_until:
            files.unavailable_answers += 1
            self.reply(503, b"labmetal is restarting")
            return
        data = files.files.get(self.path)
        if data is None:
            self.reply(404, b"not found")
            return
        start = int(re.fullmatch(r"bytes=(\d+)-", self.headers["Range"])[1]) \
            if self.headers.get("Range") else 0
        body = bytearray(data[start:])
        if self.path in files.corrupt and files.corrupt[self.path] >= start:
            body[files.corrupt[self.path] - start] ^= 0xFF
        if files.hold is not None and self.path.endswith("/packed"):
            files.hold.wait(60)
        headers = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"} if start else {}
        cut = files.drop_after.pop(self.path, None)
        try:
            if cut is None:
                self.reply(206 if start else 200, bytes(body), headers)
            else:  # announce the whole body, send part of it, hang up
                files.unavailable_until = time.monotonic() + files.outage
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(bytes(body[:cut]))
                self.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


@dataclass
class FakeLabmetal:
    """labmetal's agent endpoints as the contract states them, recording every call."""
    url: str = ""
    known: bool = True
    token: str = TOKEN
    heartbeat_timeout: float = 3
    lookups: list[list[str]] = field(default_factory=list)
    heartbeats: list[dict] = field(default_factory=list)
    discoveries: list[dict] = field(default_factory=list)
    token_given: bool = False


class _LabmetalHandler(_Handler):
    def do_GET(self) -> None:
        api: FakeLabmetal = self.server.owner
        url = urlsplit(self.path)
        if url.path != "/v1/lookup":
            self.reply(404, b"{}")
            return
        api.lookups.append(parse_qs(url.query)["addresses"][0].split(","))
        if not api.known:
            self.reply(404, b'{"error_message": "no node"}')
            return
        token = "******" if api.token_given else api.token
        api.token_given = True
        self.reply(200, json.dumps({
            "node": {"uuid": NODE, "name": "tpr2-a01", "provision_state": "wait call-back"},
            "config": {"heartbeat_timeout": api.heartbeat_timeout, "agent_token": token,
                       "agent_token_required": True}}).encode())

    def do_POST(self) -> None:
        api: FakeLabmetal = self.server.owner
        body = self.json_body()
        if self.path == f"/v1/heartbeat/{NODE}":
            api.heartbeats.append(body)
            self.reply(202 if body.get("agent_token") == api.token else 401, b"")
        elif self.path == "/v1/discovery":
            api.discoveries.append(body)
            self.reply(201, json.dumps({"node": {"uuid": NODE}}).encode())
        else:
            self.reply(404, b"{}")


def serve(handler: type, owner: Any, servers: list[_Server]) -> Any:
    server = _Server(handler, owner)
    servers.append(server)
    owner.url = server.url
    return owner


@pytest.fixture
def http_servers():
    servers: list[_Server] = []
    yield servers
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def files(http_servers) -> FileServer:
    return serve(_FileHandler, FileServer(), http_servers)


@pytest.fixture
def labmetal(http_servers) -> FakeLabmetal:
    return serve(_LabmetalHandler, FakeLabmetal(), http_servers)


# ---------------------------------------------------------------- the seat

def loops_of(path: Path) -> list[str]:
    listing = subprocess.run(["losetup", "--associated", str(path), "--output", "NAME",
                              "--noheadings"], capture_output=True, text=True).stdout
    return listing.split()


@dataclass(frozen=True)
class SeatDisk:
    path: str  # what the agent is given: the file, or a loop device over it
    file: Path  # what the checks read


@pytest.fixture
def disks(tmp_path: Path, procs: Processes):
    """Disk files for seats, given to the agent as files or as block devices (a loop device);
    loop devices and mounts over them are cleaned up even on failure."""
    made: list[Path] = []

    def make(size: int, fill: bytes | None = None, block: bool = False) -> SeatDisk:
        path = tmp_path / "seat-disk.img"
        with open(path, "wb") as out:
            if fill is None:
                out.truncate(size)
            else:
                for _ in range(size // MIB):
                    out.write(fill * (MIB // len(fill)))
        made.append(path)
        if not block:
            return SeatDisk(str(path), path)
        loop = subprocess.run(["losetup", "--find", "--show", "--partscan", str(path)],
                              capture_output=True, text=True, check=True).stdout.strip()
        return SeatDisk(loop, path)

    yield make
    procs.stop_all()  # the agent first: it may still hold the disk
    for path in made:
        for loop in loops_of(path):
            for line in Path("/proc/mounts").read_text().splitlines():
                if line.startswith(loop):
                    subprocess.run(["umount", line.split()[1]], capture_output=True)
            subprocess.run(["losetup", "--detach", loop], capture_output=True)


@dataclass
class Seat:
    url: str
    disk: SeatDisk
    api: FakeLabmetal
    log: Path

    def post(self, name: str, params: dict | None = None, request_id: str | None = None,
             token: str | None = TOKEN) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.post(f"{self.url}/v1/commands", headers=headers, timeout=10, json={
            "name": name, "params": params or {}, "request_id": request_id or f"req-{name}"})

    def get(self, path: str, token: str | None = TOKEN) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.get(f"{self.url}{path}", headers=headers, timeout=10)

    def run(self, name: str, params: dict | None = None, request_id: str | None = None,
            timeout: float = 60) -> dict:
        response = self.post(name, params, request_id)
        assert response.status_code == 202, response.text
        return self.wait(response.json()["id"], timeout)

    def deploy_partition(self, params: dict, request_id: str | None = None) -> dict:
        """The conductor's two steps for a partition image: the write, then (its receipt
        checked in between) the boot loader; one view with both results."""
        loader = {key: params.pop(key) for key in ("kernel_url", "ramdisk_url",
                                                   "kernel_cmdline") if key in params}
        view = self.run("deploy_partition_image", params, request_id)
        if view["status"] != "succeeded":
            return view
        boot = self.run("install_bootloader", loader,
                        f"{request_id}-boot" if request_id else None)
        return {**boot, "result": {**view["result"], **(boot["result"] or {})}}

    def wait(self, command_id: str, timeout: float = 60) -> dict:
        def finished() -> dict | None:
            view = self.get(f"/v1/commands/{command_id}").json()
            return view if view["status"] != "running" else None
        return wait_for(finished, timeout, f"command {command_id}", interval=0.1)


@pytest.fixture
def start_seat(procs: Processes, labmetal: FakeLabmetal, tmp_path: Path):
    def start(disk: SeatDisk, *extra: str, mode: str = "deploy") -> Seat:
        port = free_port()
        proc = procs.start([sys.executable, "-m", "labmetal.agent", "--api", labmetal.url,
                            "--mode", mode, "--disk", disk.path, "--listen", f"127.0.0.1:{port}",
                            *extra], "agent")
        proc.wait_for_output("command API listening")
        seat = Seat(f"http://127.0.0.1:{port}", disk, labmetal, proc.log_path)
        if mode == "deploy":
            wait_for(lambda: labmetal.heartbeats, 20, "the first heartbeat")
        return seat
    return start


def sha256_of(path: Path, length: int | None = None) -> str:
    with open(path, "rb") as data:
        return hashlib.sha256(data.read(length) if length else data.read()).hexdigest()


# ---------------------------------------------------------------- the agent's story
# (its kernel command line alone: tests/test_agent_options.py, fast)

def test_seat_looks_itself_up_and_heartbeats_with_its_inventory(disks, start_seat, labmetal):
    disk = disks(64 * MIB)
    seat = start_seat(disk)
    macs = sorted(Path(f"/sys/class/net/{name}/address").read_text().strip()
                  for name in os.listdir("/sys/class/net") if name != "lo")
    assert sorted(labmetal.lookups[0]) == macs

    wait_for(lambda: len(labmetal.heartbeats) >= 2, 10, "a second heartbeat")
    first, second = labmetal.heartbeats[:2]
    assert first["callback_url"] == seat.url
    assert first["agent_token"] == TOKEN and first["agent_version"]
    inventory = first["inventory"]
    assert inventory["install_disk"] == disk.path
    assert {"name": disk.path, "size": 64 * MIB, "kind": "file"}.items() <= \
        next(d for d in inventory["disks"] if d["name"] == disk.path).items()
    assert sorted(i["mac_address"] for i in inventory["interfaces"]) == macs
    assert inventory["memory"]["total"] > 0 and inventory["cpu"]["count"] >= 1
    assert inventory["boot"]["current_boot_mode"] in ("bios", "uefi")
    assert "inventory" not in second

    status = seat.get("/v1/status").json()
    assert (status["node_uuid"], status["commands"]) == (NODE, [])
    assert status["inventory"]["install_disk"] == disk.path
    assert TOKEN not in seat.log.read_text()


def test_a_new_deploy_token_is_taken_from_a_new_lookup(disks, start_seat, labmetal):
    seat = start_seat(disks(64 * MIB))
    labmetal.token, labmetal.token_given = "agent-tok-second-deploy", False
    wait_for(lambda: any(h["agent_token"] == labmetal.token for h in labmetal.heartbeats), 20,
             "a heartbeat with the new token")
    assert "inventory" in next(h for h in labmetal.heartbeats if h["agent_token"] == labmetal.token)
    assert seat.get("/v1/status", token=labmetal.token).status_code == 200
    assert seat.get("/v1/status", token=TOKEN).status_code == 401


def test_unknown_seat_in_discovery_mode_enlists_with_its_inventory(disks, start_seat, labmetal):
    labmetal.known = False
    disk = disks(64 * MIB)
    start_seat(disk, mode="discovery")
    wait_for(lambda: labmetal.discoveries, 20, "a discovery")
    assert [d["name"] for d in labmetal.discoveries[0]["inventory"]["disks"]].count(disk.path) == 1
    labmetal.known = True  # an admin gives the new node work: its lookup now succeeds
    wait_for(lambda: labmetal.heartbeats, 20, "a heartbeat after discovery")
    assert len(labmetal.discoveries) == 1


@pytest.mark.parametrize("block,readback", [(False, False), (True, False), (False, True)],
                         ids=["disk-file", "block-device", "read-back"])
def test_write_image_gives_the_image_byte_for_byte_and_zeros_over_old_garbage(
        images, files, disks, start_seat, block, readback):
    image = images["disk"]
    disk = disks(64 * MIB, fill=b"\xa5\x5a", block=block)
    seat = start_seat(disk)
    urls = files.serve("disk", image)
    view = seat.run("write_image", {**urls, "readback": readback})
    assert view["status"] == "succeeded", view["error"]
    assert view["progress"] == {"done": image.manifest.raw_size, "total": image.manifest.raw_size}
    result = view["result"]
    zero_bytes = sum(c.length for c in image.manifest.chunks if c.zero)
    assert result["raw_sha256"] == image.manifest.raw_sha256
    assert (result["bytes_written"], result["bytes_zeroed"]) == (
        image.manifest.raw_size - zero_bytes, zero_bytes)

    written = disk.file.read_bytes()
    assert written[:len(image.raw)] == image.raw
    last_zero = [c for c in image.manifest.chunks if c.zero][-1]
    assert written[last_zero.offset:last_zero.offset + last_zero.length] == bytes(CHUNK)
    assert written[len(image.raw):] == b"\xa5\x5a" * ((64 * MIB - len(image.raw)) // 2)  # untouched
    if not block:  # zero chunks were holes punched in the file, not zeros written out
        assert os.stat(disk.file).st_blocks * 512 <= 64 * MIB - zero_bytes + MIB
    assert [path for path, _ in files.requests].count("/disk/packed") == 1


def test_the_receipt_answers_a_fresh_challenge_from_the_disks_bytes(images, files, disks,
                                                                   start_seat, tmp_path):
    """prove_disk: an HMAC keyed by the conductor's nonce over random extents of the image,
    read from the disk; the conductor computes the same over its copy (agent/proof.py)."""
    image = images["disk"]
    disk = disks(64 * MIB)
    seat = start_seat(disk)
    before = seat.run("prove_disk", proof.challenge(len(image.raw)).params(), "early")
    assert before["status"] == "failed" and "no image was written" in before["error"]
    assert seat.run("write_image", files.serve("disk", image))["status"] == "succeeded"
    copy = tmp_path / "copy.raw"
    copy.write_bytes(image.raw)
    for n in range(2):  # each challenge its own: an old answer is no answer
        challenge = proof.challenge(len(image.raw))
        view = seat.run("prove_disk", challenge.params(), f"prove-{n}")
        assert view["status"] == "succeeded", view["error"]
        assert view["result"]["hmac"] == proof.digest(str(copy), 0, challenge)
    other = proof.challenge(len(image.raw))
    assert view["result"]["hmac"] != proof.digest(str(copy), 0, other)
    with open(disk.file, "r+b") as raw:  # one byte changed inside an asked extent
        offset, _ = other.extents[0]
        raw.seek(offset)
        byte = raw.read(1)
        raw.seek(offset)
        raw.write(bytes([byte[0] ^ 0xFF]))
    assert seat.run("prove_disk", other.params(), "changed")["result"]["hmac"] != \
        proof.digest(str(copy), 0, other)
    for n, bad in enumerate(({"nonce": "zz" * 16, "extents": [[0, 4096]]},
                             {"nonce": "00" * 32, "extents": [[0, 64 * MIB]]},
                             {"nonce": "00" * 32, "extents": [[-1, 4096]]},
                             {"nonce": "00" * 32, "extents": [[0, 4096]] * 257})):
        refused = seat.run("prove_disk", bad, f"bad-{n}")
        assert refused["status"] == "failed", bad


def test_a_partition_images_receipt_is_of_the_root_partition_before_its_boot_loader(
        images, files, disks, start_seat, tmp_path):
    image = images["rootfs"]
    files.files.update({"/boot/vmlinuz": b"k" * 4096, "/boot/initrd": b"i" * 4096})
    seat = start_seat(disks(64 * MIB))
    copy = tmp_path / "copy.raw"
    copy.write_bytes(image.raw)
    written = seat.run("deploy_partition_image", {**files.serve("rootfs", image),
                                                  "boot_mode": "bios"})
    assert written["status"] == "succeeded", written["error"]
    challenge = proof.challenge(len(image.raw))
    view = seat.run("prove_disk", challenge.params())
    assert view["result"]["hmac"] == proof.digest(str(copy), 0, challenge)
    boot = seat.run("install_bootloader", {"kernel_url": f"{files.url}/boot/vmlinuz",
                                           "ramdisk_url": f"{files.url}/boot/initrd"})
    assert boot["status"] == "succeeded", boot["error"]
    after = seat.run("prove_disk", proof.challenge(len(image.raw)).params(), "after")
    assert after["status"] == "failed"  # the file system changed: nothing to prove now


def test_a_corrupted_chunk_fails_the_command_naming_it(images, files, disks, start_seat):
    image = images["disk"]
    seat = start_seat(disks(64 * MIB))
    urls = files.serve("disk", image)
    bad = image.manifest.data_chunks[2]
    files.corrupt["/disk/packed"] = bad.packed_offset + bad.packed_length // 2
    view = seat.run("write_image", urls)
    assert view["status"] == "failed"
    assert f"chunk {bad.index} " in view["error"]


def test_a_disk_too_small_is_refused_before_anything_is_written(images, files, disks, start_seat):
    image = images["disk"]
    disk = disks(8 * MIB, fill=b"\x77")
    before = sha256_of(disk.file)
    seat = start_seat(disk)
    view = seat.run("write_image", files.serve("disk", image))
    assert view["status"] == "failed"
    assert view["error"] == (f"disk {disk.path} is {8 * MIB} bytes, the image needs "
                             f"{image.manifest.raw_size}")
    assert sha256_of(disk.file) == before
    assert "/disk/packed" not in [path for path, _ in files.requests]


def test_a_dropped_connection_resumes_from_the_chunk_where_it_stopped(
        images, files, disks, start_seat):
    image = images["disk"]
    disk = disks(64 * MIB)
    seat = start_seat(disk)
    urls = files.serve("disk", image)
    files.drop_after["/disk/packed"] = len(image.packed) // 2
    view = seat.run("write_image", urls)
    assert view["status"] == "succeeded", view["error"]
    assert sha256_of(disk.file, len(image.raw)) == image.manifest.raw_sha256
    ranges = [rng for path, rng in files.requests if path == "/disk/packed"]
    assert ranges[0] is None and len(ranges) == 2
    resumed_at = int(ranges[1].removeprefix("bytes=").removesuffix("-"))
    assert resumed_at in {c.packed_offset for c in image.manifest.data_chunks}
    assert 0 < resumed_at <= len(image.packed) // 2


def test_a_download_cut_by_labmetal_restarting_waits_for_it_and_resumes(
        images, files, disks, start_seat):
    """The stream breaks, then labmetal answers 503 for longer than a seat used to wait
    (7.5 s): the seat keeps asking, with backoff, and finishes once it is back."""
    image = images["disk"]
    disk = disks(64 * MIB)
    seat = start_seat(disk)
    urls = files.serve("disk", image)
    files.drop_after["/disk/packed"] = len(image.packed) // 2
    files.outage = 12.0
    view = seat.run("write_image", urls)
    assert view["status"] == "succeeded", view["error"]
    assert sha256_of(disk.file, len(image.raw)) == image.manifest.raw_sha256
    assert files.unavailable_answers >= 3  # it asked through the outage, and waited


def test_wrong_or_missing_token_is_refused_and_nothing_is_written(
        images, files, disks, start_seat):
    disk = disks(64 * MIB, fill=b"\x33")
    before = sha256_of(disk.file)
    seat = start_seat(disk)
    urls = files.serve("disk", images["disk"])
    for token in (None, "not-the-token", TOKEN + "x"):
        assert seat.post("write_image", urls, token=token).status_code == 401
        assert seat.get("/v1/status", token=token).status_code == 401
    assert seat.get("/v1/status").json()["commands"] == []
    assert files.requests == []
    assert sha256_of(disk.file) == before


def test_a_resent_request_is_the_same_command_and_one_disk_writer_at_a_time(
        images, files, disks, start_seat):
    image = images["disk"]
    seat = start_seat(disks(64 * MIB))
    urls = files.serve("disk", image)
    files.hold = threading.Event()
    first = seat.post("write_image", urls, request_id="deploy-1")
    again = seat.post("write_image", urls, request_id="deploy-1")
    assert (first.status_code, again.status_code) == (202, 202)
    assert first.json()["id"] == again.json()["id"]
    other = seat.post("write_image", urls, request_id="deploy-2")
    assert other.status_code == 409 and first.json()["id"] in other.json()["error"]
    files.hold.set()
    assert seat.wait(first.json()["id"])["status"] == "succeeded"
    assert len(seat.get("/v1/status").json()["commands"]) == 1
    assert [path for path, _ in files.requests].count("/disk/packed") == 1


def debugfs(filesystem: Path, request: str) -> str:
    return subprocess.run(["debugfs", "-R", request, str(filesystem)], capture_output=True,
                          text=True, check=True).stdout


@pytest.mark.parametrize("block", [False, True], ids=["disk-file", "block-device"])
def test_partition_image_deploy_makes_a_bootable_disk(images, files, disks, start_seat,
                                                      tmp_path, block):
    image = images["rootfs"]
    kernel, initrd = os.urandom(700 * 1024), os.urandom(1200 * 1024)
    files.files.update({"/boot/vmlinuz": kernel, "/boot/initrd": initrd})
    disk = disks(64 * MIB, block=block)
    seat = start_seat(disk)
    params = {**files.serve("rootfs", image), "kernel_url": f"{files.url}/boot/vmlinuz",
              "ramdisk_url": f"{files.url}/boot/initrd", "boot_mode": "bios",
              "kernel_cmdline": "quiet labmetal.seat=a01"}
    view = seat.deploy_partition(dict(params))
    assert view["status"] == "succeeded", view["error"]
    result = view["result"]
    assert result["raw_sha256"] == image.manifest.raw_sha256
    assert result["partition"] == {"number": 1, "start": MIB, "size": 24 * MIB}
    assert loops_of(disk.file) == ([disk.path] if block else [])  # the agent's own is detached

    table = subprocess.run(["parted", "-m", "-s", str(disk.file), "unit", "B", "print"],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    assert ":msdos:" in table[1]
    assert table[2].startswith(f"1:{MIB}B:{25 * MIB - 1}B:{24 * MIB}B:ext4:") and "boot" in table[2]
    ptuuid = subprocess.run(["blkid", "-p", "-o", "value", "-s", "PTUUID", str(disk.file)],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert result["root"] == f"PARTUUID={ptuuid}-01"
    raw = disk.file.read_bytes()
    assert raw[:440] == MBR_BIN.read_bytes()
    assert raw[446] == 0x80  # the boot flag of partition 1

    root = tmp_path / "root.img"
    root.write_bytes(raw[MIB:25 * MIB])
    assert subprocess.run(["e2fsck", "-fn", str(root)], capture_output=True).returncode == 0
    config = debugfs(root, "cat /boot/extlinux/extlinux.conf")
    assert "LINUX /boot/vmlinuz" in config and "INITRD /boot/initrd.img" in config
    append = next(line for line in config.splitlines() if "APPEND" in line)
    assert f"root=PARTUUID={ptuuid}-01" in append and "console=ttyS0" in append
    assert append.endswith("quiet labmetal.seat=a01")
    assert "ldlinux.sys" in debugfs(root, "ls /boot/extlinux")
    for path, content in (("/boot/vmlinuz", kernel), ("/boot/initrd.img", initrd)):
        debugfs(root, f"dump {path} {tmp_path / 'out'}")
        assert (tmp_path / "out").read_bytes() == content
    assert debugfs(root, "cat /etc/hostname") == "tp-reseaux\n"  # the image's own files


def test_partition_deploy_failures_leave_no_loop_device_or_mount(images, files, disks,
                                                                  start_seat):
    disk = disks(64 * MIB)
    seat = start_seat(disk)
    params = {**files.serve("rootfs", images["rootfs"]), "kernel_url": f"{files.url}/missing",
              "ramdisk_url": f"{files.url}/missing"}
    view = seat.deploy_partition(dict(params))
    assert view["status"] == "failed" and f"{files.url}/missing: HTTP 404" in view["error"]
    assert loops_of(disk.file) == []
    assert "labmetal-root-" not in Path("/proc/mounts").read_text()

    response = seat.post("deploy_partition_image", {**params, "boot_mode": "efi"}, "uefi-1")
    view = seat.wait(response.json()["id"])
    assert view["status"] == "failed" and "unknown boot_mode 'efi'" in view["error"]


def mdir(image: Path, offset: int, path: str) -> str:
    return subprocess.run(["mdir", "-b", "-i", f"{image}@@{offset}", f"::{path}"],
                          capture_output=True, text=True, check=True).stdout


def test_a_uefi_partition_image_gets_gpt_an_efi_partition_and_the_images_own_loaders(
        images, files, disks, start_seat, tmp_path):
    kernel, initrd = os.urandom(700 * 1024), os.urandom(1200 * 1024)
    files.files.update({"/boot/vmlinuz": kernel, "/boot/initrd": initrd})
    disk = disks(128 * MIB)
    seat = start_seat(disk)
    params = {**files.serve("uefi-rootfs", images["uefi-rootfs"]),
              "kernel_url": f"{files.url}/boot/vmlinuz", "ramdisk_url": f"{files.url}/boot/initrd",
              "boot_mode": "uefi", "kernel_cmdline": "quiet"}
    view = seat.deploy_partition(dict(params))
    assert view["status"] == "succeeded", view["error"]
    result = view["result"]
    root_start = MIB + 64 * MIB
    assert result["boot_mode"] == "uefi" and result["boot_loader"] == "shim and GRUB from the image"
    assert result["partition"] == {"number": 2, "start": root_start, "size": 24 * MIB}
    assert loops_of(disk.file) == []

    table = subprocess.run(["parted", "-m", "-s", str(disk.file), "unit", "B", "print"],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    assert ":gpt:" in table[1]
    assert table[2].startswith(f"1:{MIB}B:{root_start - 1}B:") and "esp" in table[2]
    assert table[3].startswith(f"2:{root_start}B:{root_start + 24 * MIB - 1}B:")
    with open(disk.file, "rb") as raw:  # GPT entries from LBA 2, 128 bytes each
        raw.seek(2 * 512 + 128)
        partuuid = str(uuid.UUID(bytes_le=raw.read(128)[16:32]))  # the partition's own GUID
    assert result["root"] == f"PARTUUID={partuuid}" and len(partuuid) == 36

    # The EFI system partition: shim on the removable path, GRUB beside it, its config.
    esp = tmp_path / "esp.img"
    esp.write_bytes(disk.file.read_bytes()[MIB:root_start])
    listing = mdir(esp, 0, "/EFI/BOOT")
    assert all(name in listing for name in ("BOOTX64", "grubx64", "grub"))
    for name, inside in (("shim", "EFI/BOOT/BOOTX64.EFI"), ("grub", "EFI/BOOT/grubx64.efi")):
        subprocess.run(["mcopy", "-i", str(esp), f"::{inside}", str(tmp_path / name)], check=True)
        assert (tmp_path / name).read_bytes() == images["loaders"][name]
    subprocess.run(["mcopy", "-i", str(esp), "::EFI/BOOT/grub.cfg", str(tmp_path / "cfg")],
                   check=True)
    subprocess.run(["mcopy", "-i", str(esp), "::EFI/debian/grub.cfg", str(tmp_path / "cfg2")],
                   check=True)  # Debian's GRUB's own prefix: read first
    assert (tmp_path / "cfg2").read_text() == (tmp_path / "cfg").read_text()
    root = tmp_path / "root.img"
    root.write_bytes(disk.file.read_bytes()[root_start:root_start + 24 * MIB])
    fs_uuid = subprocess.run(["blkid", "-o", "value", "-s", "UUID", str(root)],
                             capture_output=True, text=True, check=True).stdout.strip()
    config = (tmp_path / "cfg").read_text().splitlines()
    assert f"search --no-floppy --fs-uuid --set=root {fs_uuid}" in config
    assert any(line.startswith(f"linux /boot/vmlinuz root=PARTUUID={partuuid} ro console=tty0")
               and line.endswith(" quiet") for line in config)
    assert "initrd /boot/initrd.img" in config
    debugfs(root, f"dump /boot/vmlinuz {tmp_path / 'kernel'}")
    assert (tmp_path / "kernel").read_bytes() == kernel


def test_a_uefi_partition_image_without_loaders_is_refused_clearly_off_the_ramdisk(
        images, files, disks, start_seat):
    files.files.update({"/boot/vmlinuz": b"k", "/boot/initrd": b"i"})
    seat = start_seat(disks(128 * MIB))
    params = {**files.serve("rootfs", images["rootfs"]), "boot_mode": "uefi",
              "kernel_url": f"{files.url}/boot/vmlinuz", "ramdisk_url": f"{files.url}/boot/initrd"}
    view = seat.deploy_partition(dict(params))
    # This machine is not the ramdisk: no /usr/lib/labmetal/efi to fall back on.
    assert view["status"] == "failed"
    assert "carries no signed shim and GRUB (usr/lib/shim/shimx64.efi.signed" in view["error"]


def test_wipe_metadata_erases_partition_table_and_filesystem_signatures(images, disks,
                                                                         start_seat):
    disk = disks(64 * MIB)
    with open(disk.file, "r+b") as out:
        out.write(images["disk"].raw)
    seat = start_seat(disk)
    view = seat.run("wipe_metadata")
    assert view["status"] == "succeeded", view["error"]
    assert any("ext4" in line for line in view["result"]["erased"])
    assert loops_of(disk.file) == []
    probe = subprocess.run(["blkid", "-p", str(disk.file)], capture_output=True, text=True)
    assert probe.returncode == 2, probe.stdout  # nothing recognised
    raw = disk.file.read_bytes()
    assert raw[:MIB] == bytes(MIB) and raw[-MIB:] == bytes(MIB)
    assert raw[MIB + 0x438:MIB + 0x43A] == b"\0\0"  # the old ext4 magic inside partition 1


def test_power_off_replies_first_then_runs_the_configured_command(disks, start_seat, tmp_path):
    flag = tmp_path / "powered-off"
    seat = start_seat(disks(64 * MIB), "--poweroff-cmd", f"touch {flag}", "--reboot-cmd", "false")
    response = seat.post("power_off")
    assert response.status_code == 202 and not flag.exists()
    assert seat.wait(response.json()["id"])["status"] == "succeeded"
    assert flag.exists()
    view = seat.run("reboot")
    assert view["status"] == "failed" and "false failed (1)" in view["error"]


def test_disk_export_over_iscsi_is_delegated_and_removed_when_the_agent_stops(disks, start_seat,
                                                                           procs):
    seat = start_seat(disks(64 * MIB))
    port, iqn = free_port(), "iqn.2026-11.org.labmetal:seat-a01"
    view = seat.run("export_iscsi", {"iqn": iqn, "port": port}, "export-1")
    assert view["status"] == "succeeded", view["error"]
    assert view["result"] == {"iqn": iqn, "portal": f"127.0.0.1:{port}", "lun": 1}
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    assert seat.run("unexport_iscsi", {"iqn": iqn}, "unexport-1")["status"] == "succeeded"

    assert seat.run("export_iscsi", {"iqn": iqn, "port": port}, "export-2")["status"] == "succeeded"
    procs.stop_all()  # SIGTERM: tgtd, which ignores it and runs in its own session, goes too
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert seat.log.read_text().rstrip().endswith("stopped")
