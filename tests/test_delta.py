"""Delta re-imaging: a seat that still holds an earlier copy of the image receives and writes
only the chunks its disk lacks, and still ends with the whole image verified.

The agent is the real process on a light seat (tests/test_agent.py's seats), the image is
served over real HTTP by a small file server that honours bounded Range requests and counts
what it sends. Expected chunk sets are computed here from the raw bytes, not by the agent's
code. A delta re-image from the built ramdisk on a QEMU seat: tests/test_firmware_boots.py.
"""
from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from labmetal.agent.delta import matching_chunks
from labmetal.agent.writer import Progress
from labmetal.agent.manifest import Chunk, Manifest, build
from labmetal.lab.light_room import make_rootfs, make_whole_disk
from tests.test_agent import (  # noqa: F401 (fixtures)
    MIB, Seat, _Handler, disks, http_servers, labmetal, seat_tools, serve, sha256_of,
    start_seat)

CHUNK = MIB  # small chunks: many of them in a small image
INVERT = bytes(255 - b for b in range(256))


@dataclass(frozen=True)
class Image:
    path: Path
    raw: bytes
    manifest: Manifest
    packed: bytes

    def chunk(self, index: int) -> Chunk:
        return self.manifest.chunks[index]


def make_image(work: Path, marker: str, size_mib: int = 48, random_mib: int = 16) -> Image:
    raw = make_whole_disk(work, size_mib=size_mib, marker=marker, random_mib=random_mib)
    manifest = build(raw, raw.with_suffix(".packed"), chunk_size=CHUNK)
    return Image(raw, raw.read_bytes(), manifest, raw.with_suffix(".packed").read_bytes())


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Image]:
    """Two versions of a course's image (different files, same layout), both whole-disk."""
    work = tmp_path_factory.mktemp("images")
    made = {"week1": make_image(work, "tp-week1"), "week2": make_image(work, "tp-week2")}
    assert len(made["week1"].manifest.data_chunks) >= 20  # so that a few percent means something
    return made


@dataclass
class RangeServer:
    """Static files with single-range support (``bytes=a-b`` and ``bytes=a-``); records each
    request's path, Range header, body bytes sent and client port (one per connection)."""
    url: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[tuple[str, str | None, int, int]] = field(default_factory=list)
    drop_after: dict[str, int] = field(default_factory=dict)  # path -> body bytes, once

    def serve(self, name: str, image: Image) -> dict[str, str]:
        self.files[f"/{name}/manifest.json"] = image.manifest.to_json().encode()
        self.files[f"/{name}/packed"] = image.packed
        return {"manifest_url": f"{self.url}/{name}/manifest.json",
                "packed_url": f"{self.url}/{name}/packed"}

    def packed(self, name: str) -> list[tuple[str | None, int]]:
        return [(rng, sent) for path, rng, sent, _ in self.requests if path == f"/{name}/packed"]


class _RangeHandler(_Handler):
    def do_GET(self) -> None:
        files: RangeServer = self.server.owner
        data = files.files.get(self.path)
        if data is None:
            self.reply(404, b"not found")
            return
        start, end, status, headers = 0, len(data), 200, {}
        if self.headers.get("Range"):
            wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers["Range"])
            start = int(wanted[1])
            end = min(int(wanted[2]) + 1, len(data)) if wanted[2] else len(data)
            status, headers = 206, {"Content-Range": f"bytes {start}-{end - 1}/{len(data)}"}
        body = data[start:end]
        cut = files.drop_after.pop(self.path, None)
        files.requests.append((self.path, self.headers.get("Range"),
                               len(body) if cut is None else cut, self.client_address[1]))
        if cut is None:
            self.reply(status, body, headers)
            return
        self.send_response(status)  # announce the whole body, send part of it, hang up
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body[:cut])
        self.close_connection = True


@pytest.fixture
def files(http_servers) -> RangeServer:
    return serve(_RangeHandler, RangeServer(), http_servers)


def deployed(seat: Seat, urls: dict[str, str], request_id: str, **params: object) -> dict:
    view = seat.run("write_image", {**urls, **params}, request_id)
    assert view["status"] == "succeeded", view["error"]
    return view


def spoil(disk: Path, chunks: list[Chunk], data: bytes | None = None) -> None:
    """What a class leaves behind: other bytes in these chunks (``data``, or the chunk's
    bytes inverted)."""
    with open(disk, "r+b") as out:
        for chunk in chunks:
            out.seek(chunk.offset)
            old = out.read(chunk.length)
            out.seek(chunk.offset)
            out.write(data[:chunk.length] if data is not None else old.translate(INVERT))


def differing(old: bytes, image: Image) -> set[int]:
    """The chunks of ``image`` whose bytes are not those of ``old`` at the same place."""
    return {c.index for c in image.manifest.chunks
            if old[c.offset:c.offset + c.length] != image.raw[c.offset:c.offset + c.length]}


def runs(indexes: set[int], image: Image) -> list[str | None]:
    """The Range headers one request per run of back-to-back packed chunks gives."""
    chunks = [image.chunk(i) for i in sorted(indexes) if not image.chunk(i).zero]
    headers: list[str | None] = []
    start = end = None
    for chunk in chunks:
        if chunk.packed_offset != end:
            if start is not None:
                headers.append(f"bytes={start}-{end - 1}")
            start = chunk.packed_offset
        end = chunk.packed_offset + chunk.packed_length
    if start is not None and end == len(image.packed):
        headers.append(f"bytes={start}-" if start else None)  # the plain stream, as before
    elif start is not None:
        headers.append(f"bytes={start}-{end - 1}")
    return headers


# ---------------------------------------------------------------- the teacher's story

def test_a_seat_that_kept_last_weeks_copy_gets_only_the_chunks_the_students_changed(
        images, files, disks, start_seat):
    image = images["week1"]
    disk = disks(64 * MIB, fill=b"\x5a")
    seat = start_seat(disk)
    urls = files.serve("img", image)
    first = deployed(seat, urls, "class-1")["result"]
    assert files.packed("img") == [(None, len(image.packed))]  # one stream, as before deltas
    assert (first["chunks_total"], first["chunks_written"]) == (len(image.manifest.chunks),) * 2
    assert first["bytes_skipped"] == 0

    data = image.manifest.data_chunks
    changed = [data[3], data[4], data[-2]]  # 3 of 48 chunks (6 %), two of them back to back
    spoil(disk.file, changed)
    files.requests.clear()
    view = deployed(seat, urls, "class-2")
    result = view["result"]
    assert result["raw_sha256"] == image.manifest.raw_sha256
    assert sha256_of(disk.file, len(image.raw)) == image.manifest.raw_sha256
    assert disk.file.read_bytes()[len(image.raw):] == b"\x5a" * (64 * MIB - len(image.raw))
    assert result["chunks_written"] == len(changed)
    assert (result["bytes_written"], result["bytes_zeroed"]) == (len(changed) * CHUNK, 0)
    assert result["bytes_skipped"] == len(image.raw) - len(changed) * CHUNK
    assert files.packed("img") == [(rng, _length(rng, image)) for rng in
                                   runs({c.index for c in changed}, image)]
    assert sum(sent for _, sent in files.packed("img")) == sum(c.packed_length for c in changed)
    assert len({port for *_, port in files.requests}) == 1  # manifest and runs: one connection
    assert view["progress"] == {"done": len(image.raw), "total": len(image.raw)}


def _length(header: str, image: Image) -> int:
    start, end = header.removeprefix("bytes=").split("-")
    return (int(end) + 1 if end else len(image.packed)) - int(start)


def test_a_seat_whose_disk_already_holds_the_image_fetches_nothing(images, files, disks,
                                                                   start_seat):
    image = images["week1"]
    disk = disks(64 * MIB)
    disk.file.write_bytes(image.raw + bytes(64 * MIB - len(image.raw)))
    seat = start_seat(disk)
    result = deployed(seat, files.serve("img", image), "again")["result"]
    assert result["raw_sha256"] == image.manifest.raw_sha256
    assert (result["chunks_written"], result["bytes_written"]) == (0, 0)
    assert files.packed("img") == []


def test_chunks_changed_to_zeros_and_zeros_changed_to_data_are_both_put_back(
        images, files, disks, start_seat):
    image = images["week1"]
    disk = disks(64 * MIB)
    seat = start_seat(disk)
    urls = files.serve("img", image)
    deployed(seat, urls, "class-1")
    wiped = image.manifest.data_chunks[5]
    scribbled = [c for c in image.manifest.chunks if c.zero][1]
    spoil(disk.file, [wiped], bytes(CHUNK))  # a student zeroed a chunk
    spoil(disk.file, [scribbled], b"\x01" * CHUNK)  # and wrote where the image has zeros
    files.requests.clear()
    result = deployed(seat, urls, "class-2")["result"]
    assert sha256_of(disk.file, len(image.raw)) == image.manifest.raw_sha256
    assert result["chunks_written"] == 2
    assert (result["bytes_written"], result["bytes_zeroed"]) == (CHUNK, CHUNK)
    assert files.packed("img") == [(runs({wiped.index}, image)[0], wiped.packed_length)]


def test_a_disk_holding_another_image_gets_the_chunks_that_differ(images, files, disks,
                                                                  start_seat):
    old, new = images["week1"], images["week2"]
    disk = disks(64 * MIB)
    seat = start_seat(disk)
    deployed(seat, files.serve("old", old), "week-1")
    expected = differing(old.raw, new)
    assert 0 < len(expected) < len(new.manifest.chunks)  # the same layout: zeros in common
    files.requests.clear()
    result = deployed(seat, files.serve("new", new), "week-2")["result"]
    assert sha256_of(disk.file, len(new.raw)) == new.manifest.raw_sha256
    assert result["chunks_written"] == len(expected)
    assert [rng for rng, _ in files.packed("new")] == runs(expected, new)


def test_delta_off_writes_everything_like_a_first_deploy(images, files, disks, start_seat):
    image = images["week1"]
    disk = disks(64 * MIB)
    seat = start_seat(disk)
    urls = files.serve("img", image)
    deployed(seat, urls, "class-1")
    files.requests.clear()
    result = deployed(seat, urls, "class-2", delta=False)["result"]
    zero_bytes = sum(c.length for c in image.manifest.chunks if c.zero)
    assert (result["bytes_written"], result["bytes_zeroed"]) == (len(image.raw) - zero_bytes,
                                                                 zero_bytes)
    assert files.packed("img") == [(None, len(image.packed))]


def test_a_connection_dropped_in_a_run_resumes_inside_that_run(images, files, disks,
                                                                start_seat):
    image = images["week1"]
    disk = disks(64 * MIB)
    seat = start_seat(disk)
    urls = files.serve("img", image)
    deployed(seat, urls, "class-1")
    data = image.manifest.data_chunks
    changed = data[2:6]  # one run of four chunks, not at the end of the packed file
    spoil(disk.file, changed)
    files.requests.clear()
    files.drop_after["/img/packed"] = changed[0].packed_length + changed[1].packed_length // 2
    result = deployed(seat, urls, "class-2")["result"]
    assert sha256_of(disk.file, len(image.raw)) == image.manifest.raw_sha256
    assert result["chunks_written"] == 4
    end = changed[-1].packed_offset + changed[-1].packed_length - 1
    assert [rng for rng, _ in files.packed("img")] == [
        f"bytes={changed[0].packed_offset}-{end}", f"bytes={changed[1].packed_offset}-{end}"]


def test_a_partition_image_redeploy_rewrites_little_and_still_boots(tmp_path, files, disks,
                                                                    start_seat):
    """Redeploying a partition image wipes the disk's metadata and makes the partition again
    at the same place: the scan then finds most of the file system where it was."""
    rootfs = make_rootfs(tmp_path, 24, "tp-part", random_mib=8)
    manifest = build(rootfs, rootfs.with_suffix(".packed"), chunk_size=CHUNK)
    image = Image(rootfs, rootfs.read_bytes(), manifest, rootfs.with_suffix(".packed").read_bytes())
    files.files.update({"/boot/vmlinuz": os.urandom(300 * 1024),
                        "/boot/initrd": os.urandom(400 * 1024)})
    disk = disks(64 * MIB)
    seat = start_seat(disk)
    params = {**files.serve("part", image), "kernel_url": f"{files.url}/boot/vmlinuz",
              "ramdisk_url": f"{files.url}/boot/initrd", "boot_mode": "bios"}
    first = seat.deploy_partition(dict(params), "class-1")
    assert first["status"] == "succeeded", first["error"]
    before = disk.file.read_bytes()[MIB:MIB + len(image.raw)]  # the bootloader added /boot
    expected = differing(before, image)
    assert 0 < len(expected) < len(manifest.chunks) // 2

    view = seat.deploy_partition(dict(params), "class-2")
    assert view["status"] == "succeeded", view["error"]
    result = view["result"]
    assert result["raw_sha256"] == manifest.raw_sha256
    assert result["chunks_written"] >= len(expected)  # and what wipefs erased: the magic
    assert result["chunks_written"] <= len(expected) + 1
    root = tmp_path / "root.img"
    root.write_bytes(disk.file.read_bytes()[MIB:MIB + 24 * MIB])
    assert subprocess.run(["e2fsck", "-fn", str(root)], capture_output=True).returncode == 0


# ---------------------------------------------------------------- the scan on its own

def test_the_scan_skips_holes_and_refuses_chunks_past_the_disk_end(images, tmp_path):
    image = images["week1"]
    short = tmp_path / "short.disk"
    cut = image.manifest.chunks[-8].offset + CHUNK // 2  # inside a chunk
    short.write_bytes(image.raw[:cut])
    progress = Progress()
    have = matching_chunks(str(short), image.manifest, progress)
    assert have == {c.index for c in image.manifest.chunks if c.offset + c.length <= cut}
    assert (progress.done, progress.total) == (len(image.raw), len(image.raw))

    sparse = tmp_path / "sparse.disk"
    with open(sparse, "wb") as out:
        out.truncate(len(image.raw))
    assert matching_chunks(str(sparse), image.manifest) == {
        c.index for c in image.manifest.chunks if c.zero}
    holes = tmp_path / "image-with-holes.disk"
    subprocess.run(["cp", "--sparse=always", str(image.path), str(holes)], check=True)
    assert os.stat(holes).st_blocks * 512 < len(image.raw)  # the zero chunks are holes
    assert matching_chunks(str(holes), image.manifest) == set(range(len(image.manifest.chunks)))


def test_the_scan_reads_a_block_device(images, tmp_path):
    image = images["week1"]
    backing = tmp_path / "seat.disk"
    backing.write_bytes(image.raw)
    spoil(backing, [image.manifest.data_chunks[1]])
    loop = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True,
                          text=True, check=True).stdout.strip()
    try:
        have = matching_chunks(loop, image.manifest)
    finally:
        subprocess.run(["losetup", "--detach", loop], check=True)
    assert set(range(len(image.manifest.chunks))) - have == {image.manifest.data_chunks[1].index}

