"""The seat's labmetal cache (agent/seat_cache.py) at the end of its disk, and the seat's side of
a local session that reads and writes it (agent/session_sync.py): the disks here are sparse
files. The cache's state is on a disk a student can write (they are root in the session OS),
so a hostile state is crafted byte by byte and must be refused with CacheError, never a crash."""
from __future__ import annotations

import hashlib
import io
import json
import struct
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from labmetal.agent import block_wire, cow, seat_cache, session_sync
from labmetal.agent.block_wire import Digest
from labmetal.agent.seat_cache import (
    MAGIC,
    MIB,
    STATE_OFFSET,
    Cache,
    CacheError,
    Origin,
    Overlay,
    State,
)
from labmetal.agent.session_sync import Region, SyncError

pytestmark = pytest.mark.fast

GIB = 1024 * MIB
SESSION = "0b6f1c7e-5d2a-4f8e-9a43-2c1d7e6b9f10"
SHA = hashlib.sha256(b"template v3").hexdigest()


def make_disk(tmp_path: Path, size: int = GIB, name: str = "disk") -> str:
    path = tmp_path / name
    with open(path, "wb") as disk:
        disk.truncate(size)
    return str(path)


@pytest.fixture
def disk(tmp_path: Path) -> str:
    return make_disk(tmp_path)


def full_state(origin_size: int = 100 * MIB + 512, chunk_sectors: int = 128,
               complete: bool = True, uploaded: bool = False) -> State:
    return State(Origin("debian-tp", 3, SHA, origin_size, complete),
                 Overlay(SESSION, SHA, chunk_sectors, uploaded))


def write_state_bytes(cache: Cache, data: bytes, length: int | None = None) -> None:
    """The state as a student could write it: any JSON, with a checksum that matches it."""
    length = len(data) if length is None else length
    with open(cache.disk, "r+b") as disk:
        disk.seek(cache.start + STATE_OFFSET)
        disk.write(struct.pack("<I", length) + hashlib.sha256(data).digest() + data)


def state_dict(**changes: Any) -> dict[str, Any]:
    state = json.loads(full_state().to_json())
    for key, value in changes.items():
        part, field = key.split("__")
        state[part][field] = value
    return state


# -- where the cache is, and finding it again -------------------------------------------------
def test_a_cache_made_at_the_end_of_a_disk_is_found_again(disk: str) -> None:
    made = seat_cache.create(disk, 256 * MIB)
    assert made.start == GIB - MIB - 256 * MIB and made.end == GIB - MIB
    assert made.state == State() and len(made.cache_id) == 32
    with open(disk, "rb") as raw:
        raw.seek(made.start)
        assert raw.read(48) == MAGIC + made.cache_id.encode()
    assert seat_cache.find(disk) == made


@pytest.mark.parametrize("hint", ["right", 64 * MIB, 64 * MIB + 512, 0, -MIB, 2 * GIB])
def test_a_cache_is_found_with_labmetals_hint_right_or_wrong(disk: str, hint: Any) -> None:
    made = seat_cache.create(disk, 512 * MIB)
    assert seat_cache.find(disk, made.start if hint == "right" else hint) == made


def test_a_disk_without_a_cache_has_none(disk: str) -> None:
    assert seat_cache.find(disk) is None
    assert seat_cache.find(disk, 512 * MIB) is None


def test_ensure_keeps_the_cache_a_disk_has(disk: str) -> None:
    made = seat_cache.ensure(disk, 128 * MIB)
    assert made.size == 128 * MIB
    kept = seat_cache.save_state(made, full_state(origin_size=16 * MIB))
    again = seat_cache.ensure(disk, 512 * MIB, hint=made.start)
    assert again == kept and again.size == 128 * MIB


def test_a_cache_size_is_rounded_down_to_64_mib(disk: str) -> None:
    assert seat_cache.create(disk, 200 * MIB).size == 192 * MIB


@pytest.mark.parametrize("disk_size, size", [(GIB, 0), (GIB, 63 * MIB), (GIB, GIB),
                                             (GIB, 960 * MIB), (128 * MIB, 64 * MIB),
                                             (MIB, 64 * MIB)])
def test_a_cache_that_does_not_fit_on_the_disk_is_refused(tmp_path: Path, disk_size: int,
                                                          size: int) -> None:
    small = make_disk(tmp_path, disk_size)
    with pytest.raises(CacheError, match="does not fit"):
        seat_cache.create(small, size)
    assert seat_cache.find(small) is None


@pytest.mark.parametrize("size", [100 * MIB, 64 * MIB + 512, 0, -64 * MIB])
def test_a_cache_size_not_a_multiple_of_64_mib_is_refused_by_place(size: int) -> None:
    with pytest.raises(CacheError, match="multiple of 64 MiB"):
        seat_cache.place(GIB, size)


# -- the state --------------------------------------------------------------------------------
def test_a_saved_state_is_read_back(disk: str) -> None:
    cache = seat_cache.create(disk, 256 * MIB)
    saved = seat_cache.save_state(cache, full_state())
    assert saved.state == full_state() and saved.cache_id == cache.cache_id
    assert seat_cache.find(disk) == saved
    assert seat_cache.find(disk).describe()["state"]["overlay"]["session"] == SESSION


def test_a_state_that_is_not_valid_is_not_saved(disk: str) -> None:
    cache = seat_cache.save_state(seat_cache.create(disk, 256 * MIB), full_state())
    bad = State(overlay=Overlay("not-a-uuid", SHA, 128))
    with pytest.raises(CacheError, match="overlay record"):
        seat_cache.save_state(cache, bad)
    assert seat_cache.find(disk) == cache


def test_a_state_with_flipped_bytes_is_refused(disk: str) -> None:
    cache = seat_cache.save_state(seat_cache.create(disk, 256 * MIB), full_state())
    with open(disk, "r+b") as raw:
        raw.seek(cache.start + STATE_OFFSET + 36 + 20)
        byte = raw.read(1)
        raw.seek(-1, io.SEEK_CUR)
        raw.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(CacheError, match="does not match its checksum"):
        seat_cache.find(disk)


def test_a_state_claiming_ten_megabytes_is_refused_before_it_is_read(disk: str) -> None:
    cache = seat_cache.create(disk, 256 * MIB)
    write_state_bytes(cache, b"{}", length=10 * 1000 * 1000)
    with pytest.raises(CacheError, match="claims 10000000 bytes"):
        seat_cache.find(disk)


HOSTILE = {
    "a session that is not a UUID": state_dict(overlay__session="../../etc/passwd"),
    "an upper-case session": state_dict(overlay__session=SESSION.upper()),
    "a negative size": state_dict(origin__size=-4096),
    "a size of zero": state_dict(origin__size=0),
    "a size as text": state_dict(origin__size="4096"),
    "chunk_sectors below 8": state_dict(overlay__chunk_sectors=4),
    "chunk_sectors above 2048": state_dict(overlay__chunk_sectors=4096),
    "a version of 0": state_dict(origin__version=0),
    "a sha256 that is not hex": state_dict(origin__sha256="z" * 64),
    "an overlay sha256 too short": state_dict(overlay__origin_sha256="0" * 63),
    "a template name of 1000 bytes": state_dict(origin__template="x" * 1000),
    "complete as text": state_dict(origin__complete="yes"),
    "uploaded as a number": state_dict(overlay__uploaded=1),
    "a field the agent does not know": state_dict(overlay__owner="root"),
    "a field missing": {"origin": {"template": "t", "version": 1}, "overlay": None},
    "an origin that is a list": {"origin": [1, 2], "overlay": None},
    "an origin that is text": {"origin": "debian", "overlay": None},
    "a state that is a list": [1, 2, 3],
}


@pytest.mark.parametrize("state", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_hostile_state_with_a_valid_checksum_is_refused(disk: str, state: Any) -> None:
    cache = seat_cache.create(disk, 256 * MIB)
    write_state_bytes(cache, json.dumps(state).encode())
    with pytest.raises(CacheError):
        seat_cache.find(disk)


@pytest.mark.parametrize("data", [b"{not json", b"\xff\xfe\x00", b"[" * 30_000 + b"]" * 30_000,
                                  b'{"origin": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"],
                         ids=["not JSON", "not text", "nested lists", "nested origin"])
def test_a_state_that_is_not_json_is_refused(disk: str, data: bytes) -> None:
    cache = seat_cache.create(disk, 256 * MIB)
    write_state_bytes(cache, data)
    with pytest.raises(CacheError, match="cannot be read"):
        seat_cache.find(disk)


def test_a_cache_id_that_is_not_hex_is_not_a_cache(disk: str) -> None:
    cache = seat_cache.create(disk, 256 * MIB)
    with open(disk, "r+b") as raw:
        raw.seek(cache.start + 16)
        raw.write(b"\xff" * 32)
    assert seat_cache.find(disk) is None


# -- room images and the session's kernel command line ----------------------------------------
def test_a_room_image_reaching_into_the_cache_is_refused(disk: str) -> None:
    cache = seat_cache.create(disk, 256 * MIB)
    with pytest.raises(CacheError, match="would overwrite the cache"):
        seat_cache.check_room_image(disk, cache.start + 1)
    with pytest.raises(CacheError):
        seat_cache.check_room_image(disk, GIB)


def test_a_room_image_that_stops_before_the_cache_is_taken(disk: str) -> None:
    cache = seat_cache.create(disk, 256 * MIB)
    seat_cache.check_room_image(disk, cache.start)
    seat_cache.check_room_image(disk, 10 * MIB)


def test_any_room_image_is_taken_on_a_disk_without_a_cache(disk: str) -> None:
    seat_cache.check_room_image(disk, GIB)


def test_the_kernel_args_give_the_sectors_the_session_initramfs_expects(disk: str) -> None:
    cache = seat_cache.save_state(seat_cache.create(disk, 512 * MIB), full_state())
    # the cache starts 1 MiB + 512 MiB before the end of the 1 GiB disk: at 511 MiB; the
    # origin (100 MiB + 512 bytes) from 1 MiB into it, the overlay from the next MiB: 102 MiB
    assert seat_cache.kernel_args(cache, 2048 * 512, 8 * MIB, "ext4") == [
        f"labmetal.cache={cache.cache_id}@{511 * 2048}",
        f"labmetal.origin=2048+{100 * 2048 + 1}",
        f"labmetal.cow={102 * 2048}+{410 * 2048}",
        "labmetal.chunk=128",
        f"labmetal.root=2048+{8 * 2048}",
        "labmetal.fstype=ext4",
    ]


@pytest.mark.parametrize("state", [State(), full_state(complete=False),
                                   State(full_state().origin, None),
                                   State(None, full_state().overlay)],
                         ids=["empty", "origin not complete", "no overlay", "no origin"])
def test_no_kernel_args_without_a_complete_origin_and_an_overlay(disk: str,
                                                                 state: State) -> None:
    cache = seat_cache.save_state(seat_cache.create(disk, 512 * MIB), state)
    with pytest.raises(CacheError, match="no complete template"):
        seat_cache.kernel_args(cache, 1 * MIB, 8 * MIB, "ext4")


# -- a region of the disk as a file -----------------------------------------------------------
def pattern(size: int) -> bytes:
    return bytes(range(256)) * (size // 256)


def test_a_region_reads_and_seeks_inside_its_bounds(tmp_path: Path) -> None:
    path = tmp_path / "disk"
    path.write_bytes(pattern(64 * 1024))
    with Region(str(path), 4096, 8192, writable=False) as region:
        assert region.read() == pattern(64 * 1024)[4096:12288]
        assert region.read(10) == b"" and region.tell() == 8192
        assert region.seek(-10, io.SEEK_END) == 8182
        assert region.read(100) == pattern(64 * 1024)[12278:12288]
        assert region.seek(-100_000, io.SEEK_CUR) == 0
        assert region.seek(5, io.SEEK_SET) == 5 and region.seek(3, io.SEEK_CUR) == 8
        buffer = bytearray(16)
        assert region.readinto(buffer) == 16 and bytes(buffer) == pattern(256)[8:24]
        region.seek(9000)
        assert region.read(1) == b""


def test_a_region_writes_only_inside_its_bounds(tmp_path: Path) -> None:
    path = tmp_path / "disk"
    path.write_bytes(bytes(64 * 1024))
    with Region(str(path), 4096, 8192, writable=True) as region:
        region.seek(8192 - 4)
        assert region.write(b"last") == 4 and region.tell() == 8192
        region.seek(8190)
        with pytest.raises(OSError, match="past the end of the region"):
            region.write(b"toolong")
        region.seek(0)
        region.write(memoryview(b"first"))
    data = path.read_bytes()
    assert data[4096:4101] == b"first" and data[12284:12288] == b"last"
    assert data.count(0) == len(data) - 9


def test_a_read_only_region_cannot_be_written(tmp_path: Path) -> None:
    path = tmp_path / "disk"
    path.write_bytes(bytes(8192))
    with Region(str(path), 0, 8192, writable=False) as region:
        assert not region.writable()
        with pytest.raises(OSError):
            region.write(b"x")
    assert path.read_bytes() == bytes(8192)


# -- uploading the overlay: marked uploaded only once labmetal verified it --------------------
SECTORS = 8
CHUNK = SECTORS * 512
ORIGIN_SIZE = 16 * MIB


def chunk(number: int) -> bytes:
    return number.to_bytes(4, "little") * (CHUNK // 4)


STUDENT = [(0, chunk(1)), (CHUNK, chunk(2)), (10 * CHUNK, chunk(3)),
           (ORIGIN_SIZE - CHUNK, chunk(4))]


class FakeSeatClient:
    """labmetal as the seat sees it: takes pieces, checks them as the server would, and
    answers (or refuses) the final check."""

    def __init__(self, disk: str, refuse: bool = False, holds: bytes = b"") -> None:
        self.disk, self.refuse, self.holds = disk, refuse, holds
        self.numbers: list[int] = []
        self.blocks: list[tuple[int, bytes]] = []
        self.checked = Digest()
        self.asked: list[tuple[str, int, str]] = []
        self.state_when_asked: State | None = None

    def hashes(self, session: str, disk_size: int, chunk_bytes: int) -> dict[int, bytes]:
        """The store's chunk list, as labmetal sends it (block_wire.encode_hashes)."""
        assert session == SESSION
        return block_wire.read_hashes(self.holds, disk_size, chunk_bytes)

    def upload(self, session: str, number: int, piece: bytes) -> None:
        assert session == SESSION
        got = block_wire.read(io.BytesIO(piece), ORIGIN_SIZE, CHUNK)
        assert isinstance(got, block_wire.Piece)
        self.numbers.append(number)
        self.checked.add(got.sha256)
        for offset, data in got.blocks():
            self.blocks += [(offset + at, data[at:at + CHUNK])
                            for at in range(0, len(data), CHUNK)]

    def uploaded(self, session: str, digest: Digest, saves: list[str] | None = None) -> None:
        self.asked.append((session, digest.pieces, digest.value))
        self.saves = list(saves or [])
        cache = seat_cache.find(self.disk)
        assert cache is not None
        self.state_when_asked = cache.state
        if self.refuse:
            raise SyncError("upload check: HTTP 409: the pieces do not match")


def seat_with_overlay(disk: str) -> Cache:
    cache = seat_cache.create(disk, 256 * MIB)
    with session_sync.overlay_region(cache, ORIGIN_SIZE, writable=True) as region:
        cow.write_store(region, region.size, SECTORS, STUDENT)
    return seat_cache.save_state(cache, State(Origin("debian-tp", 3, SHA, ORIGIN_SIZE, True),
                                              Overlay(SESSION, SHA, SECTORS, uploaded=False)))


def overlay_store(cache: Cache) -> tuple[cow.CowStore | None, list[tuple[int, bytes]]]:
    with session_sync.overlay_region(cache, ORIGIN_SIZE, writable=False) as region:
        store = cow.read_store(region, region.size, ORIGIN_SIZE)
        return store, [] if store is None else list(cow.read_chunks(region, store))


def test_an_overlay_is_marked_uploaded_only_after_labmetal_verified_it(disk: str) -> None:
    cache = seat_with_overlay(disk)
    client = FakeSeatClient(disk)
    said: list[str] = []
    done = session_sync.upload(client, cache, SESSION, said.append)  # type: ignore[arg-type]

    assert client.blocks == STUDENT
    assert client.numbers == list(range(len(client.numbers))) and client.numbers
    assert client.asked == [(SESSION, client.checked.pieces, client.checked.value)]
    assert client.state_when_asked is not None
    assert client.state_when_asked.overlay is not None
    assert client.state_when_asked.overlay.uploaded is False
    assert done.state.overlay is not None and done.state.overlay.uploaded is True
    assert seat_cache.find(disk) == done
    assert "verified by labmetal" in said[-1]


def test_an_uploaded_overlays_chunks_are_zeroed_for_the_next_student(disk: str) -> None:
    cache = seat_with_overlay(disk)
    store, _ = overlay_store(cache)
    assert store is not None
    last = max(new for _, new in store.exceptions)
    session_sync.upload(FakeSeatClient(disk), cache, SESSION)  # type: ignore[arg-type]
    assert overlay_store(cache) == (None, [])
    with session_sync.overlay_region(cache, ORIGIN_SIZE, writable=False) as region:
        assert region.read((last + 2) * CHUNK) == bytes((last + 2) * CHUNK)


def test_an_overlay_labmetal_did_not_verify_stays_on_the_seat(disk: str) -> None:
    cache = seat_with_overlay(disk)
    before = overlay_store(cache)
    with pytest.raises(SyncError, match="do not match"):
        session_sync.upload(FakeSeatClient(disk, refuse=True), cache,  # type: ignore[arg-type]
                            SESSION)
    found = seat_cache.find(disk)
    assert found is not None and found.state.overlay is not None
    assert found.state.overlay.uploaded is False
    assert overlay_store(cache) == before and before[1] == STUDENT


def test_only_the_chunks_the_store_does_not_hold_are_uploaded(disk: str) -> None:
    cache = seat_with_overlay(disk)
    same, changed = STUDENT[0], STUDENT[1:]
    stale = (changed[0][0], hashlib.sha256(b"what the store held before").digest())
    holds = block_wire.encode_hashes([(same[0], hashlib.sha256(same[1]).digest()), stale])
    client = FakeSeatClient(disk, holds=holds)
    said: list[str] = []
    done = session_sync.upload(client, cache, SESSION, said.append)  # type: ignore[arg-type]
    assert client.blocks == changed  # the stale one included: its bytes differ
    assert "1 unchanged chunk(s) not sent" in said[-1]
    assert done.state.overlay is not None and done.state.overlay.uploaded


def test_a_broken_chunk_list_sends_every_chunk(disk: str) -> None:
    cache = seat_with_overlay(disk)
    client = FakeSeatClient(disk, holds=b"\0" * 41)
    said: list[str] = []
    session_sync.upload(client, cache, SESSION, said.append)  # type: ignore[arg-type]
    assert client.blocks == STUDENT
    assert any("chunk list is unusable" in line for line in said)


def test_an_empty_overlay_is_uploaded_as_no_pieces(disk: str) -> None:
    cache = seat_with_overlay(disk)
    with session_sync.overlay_region(cache, ORIGIN_SIZE, writable=True) as region:
        region.write(bytes(CHUNK))  # a new store: the session OS never wrote to it
    client = FakeSeatClient(disk)
    done = session_sync.upload(client, cache, SESSION)  # type: ignore[arg-type]
    assert client.numbers == [] and client.asked == [(SESSION, 0, Digest().value)]
    assert done.state.overlay is not None and done.state.overlay.uploaded


@pytest.mark.parametrize("session", [str(uuid.UUID(int=1)), SESSION.replace("0b", "ff", 1)])
def test_a_seat_uploads_no_other_session_than_the_one_it_holds(disk: str, session: str) -> None:
    cache = seat_with_overlay(disk)
    client = FakeSeatClient(disk)
    with pytest.raises(SyncError, match="holds no overlay of session"):
        session_sync.upload(client, cache, session)  # type: ignore[arg-type]
    assert client.numbers == [] and client.asked == []
    assert overlay_store(cache)[1] == STUDENT


# -- save points asked from inside the session OS --------------------------------------------
SAVE_SCRIPT = Path(__file__).resolve().parent.parent / "images" / "session_save.sh"


def os_save(cache: Cache, tmp_path: Path, label: str) -> subprocess.CompletedProcess:
    """What the student types in the session OS: the script as the session initramfs puts
    it in /run/labmetal, beside its "cache" file (the disk, the requests' sector)."""
    here = tmp_path / "run-labmetal"
    here.mkdir(exist_ok=True)
    (here / "save").write_bytes(SAVE_SCRIPT.read_bytes())
    (here / "cache").write_text(f"{cache.disk} "
                                f"{(cache.start + seat_cache.REQUESTS_OFFSET) // 512}\n")
    return subprocess.run(["sh", str(here / "save"), label], capture_output=True, text=True,
                          timeout=30)


def test_saves_asked_in_the_os_are_kept_on_the_disk_and_carried_by_the_upload(
        disk: str, tmp_path: Path) -> None:
    cache = seat_with_overlay(disk)
    assert seat_cache.save_requests(cache) == []
    for label in ("before firewall", "après le TP"):
        done = os_save(cache, tmp_path, label)
        assert done.returncode == 0 and "queued on this seat's disk" in done.stdout, done
    assert seat_cache.save_requests(cache) == ["before firewall", "après le TP"]
    client = FakeSeatClient(disk)
    said: list[str] = []
    session_sync.upload(client, cache, SESSION, said.append)  # type: ignore[arg-type]
    assert client.saves == ["before firewall", "après le TP"]
    assert "save point(s) made: before firewall, après le TP" in said[-1]
    assert seat_cache.save_requests(cache) == []  # carried: not asked again


def test_the_os_save_command_refuses_what_labmetal_would(disk: str, tmp_path: Path) -> None:
    cache = seat_with_overlay(disk)
    assert os_save(cache, tmp_path, "").returncode == 2
    assert os_save(cache, tmp_path, "x" * 65).returncode == 2
    for number in range(seat_cache.REQUESTS_MAX):
        assert os_save(cache, tmp_path, f"save {number}").returncode == 0
    full = os_save(cache, tmp_path, "one too many")
    assert full.returncode == 1 and "16 saves are queued" in full.stderr
    assert len(seat_cache.save_requests(cache)) == seat_cache.REQUESTS_MAX


@pytest.mark.parametrize("written", [
    b"not the magic\nlabel\n",
    seat_cache.REQUESTS_MAGIC + b"\x01bell\n" + b"y" * 65 + b"\n\xff\xfe\n\n",
])
def test_save_requests_a_student_wrote_by_hand_are_read_as_hostile(disk: str,
                                                                   written: bytes) -> None:
    cache = seat_with_overlay(disk)
    with open(disk, "r+b") as out:
        out.seek(cache.start + seat_cache.REQUESTS_OFFSET)
        out.write(written)
    assert seat_cache.save_requests(cache) == []
    with open(disk, "r+b") as out:
        out.seek(cache.start + seat_cache.REQUESTS_OFFSET)
        out.write(seat_cache.REQUESTS_MAGIC + b"".join(b"s%d\n" % n for n in range(40)))
    assert seat_cache.save_requests(cache) == [f"s{n}" for n in range(16)]
