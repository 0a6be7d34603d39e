"""The agent reads a student's COW store (a device-mapper persistent snapshot exception store)
to upload their changed chunks, and writes one holding their chunks when they resume on
another seat. The stores here are files; hostile stores are crafted byte by byte with struct,
from the layout in drivers/md/dm-snap-persistent.c, not with the module's own writer."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

from labmetal.agent.cow import (
    CowError,
    CowStore,
    capacity,
    read_chunks,
    read_store,
    write_empty,
    write_store,
)

pytestmark = pytest.mark.fast

SECTORS = 8  # 4 KiB chunks: 256 exceptions per area, an area spans 257 chunks
CHUNK = SECTORS * 512
PER_AREA = CHUNK // 16
MAGIC = 0x70416E53
ORIGIN = 4096 * CHUNK  # a 16 MiB template


def chunk_data(number: int) -> bytes:
    return number.to_bytes(4, "little") * (CHUNK // 4)


def write(path: Path, size: int, chunks: list[tuple[int, bytes]],
          sectors: int = SECTORS) -> int:
    with open(path, "w+b") as dev:
        dev.truncate(size)
        return write_store(dev, size, sectors, chunks)


def read_any(path: Path, size: int | None = None, origin: int = ORIGIN) -> CowStore | None:
    size = path.stat().st_size if size is None else size
    with open(path, "rb") as dev:
        return read_store(dev, size, origin)


def read(path: Path, size: int | None = None, origin: int = ORIGIN) -> CowStore:
    store = read_any(path, size, origin)
    assert store is not None, "a new store"
    return store


def craft(path: Path, header: tuple[int, int, int, int], areas: dict[int, list[tuple[int, int]]],
          chunks: int = 600, chunk_bytes: int = CHUNK) -> Path:
    """A store file of ``chunks`` chunks: the header, and metadata chunks by chunk index."""
    image = bytearray(chunks * chunk_bytes)
    struct.pack_into("<4I", image, 0, *header)
    for where, exceptions in areas.items():
        for index, pair in enumerate(exceptions):
            struct.pack_into("<QQ", image, where * chunk_bytes + 16 * index, *pair)
    path.write_bytes(bytes(image))
    return path


GOOD = (MAGIC, 1, 1, SECTORS)


def test_a_students_few_chunks_round_trip(tmp_path: Path) -> None:
    store_file = tmp_path / "cow"
    chunks = [(3 * CHUNK, chunk_data(3)), (7 * CHUNK, chunk_data(7)),
              (4000 * CHUNK, chunk_data(4000))]
    used = write(store_file, 64 * CHUNK, chunks)
    store = read(store_file)
    assert store == CowStore(SECTORS, ((3, 2), (7, 3), (4000, 4)))
    assert store.chunk_bytes == CHUNK
    assert store.changed() == [(3, 2), (7, 3), (4000, 4)]
    with open(store_file, "rb") as dev:
        assert list(read_chunks(dev, store)) == chunks
    assert used == 5 * CHUNK  # header, area 0's metadata, 3 data chunks


def test_the_next_metadata_chunk_is_zeroed_when_it_fits(tmp_path: Path) -> None:
    store_file = tmp_path / "cow"
    store_file.write_bytes(b"\xff" * (600 * CHUNK))
    second_area = 1 + PER_AREA + 1
    with open(store_file, "r+b") as dev:
        used = write_store(dev, 600 * CHUNK, SECTORS, [(0, chunk_data(0))])
    assert used == (second_area + 1) * CHUNK
    assert store_file.read_bytes()[second_area * CHUNK:used] == bytes(CHUNK)


def test_any_non_zero_valid_flag_is_valid_as_for_the_kernel(tmp_path: Path) -> None:
    store_file = craft(tmp_path / "cow", (MAGIC, 7, 1, SECTORS), {1: [(0, 2)]})
    assert read(store_file).exceptions == ((0, 2),)


def test_the_header_and_metadata_are_the_kernels_layout(tmp_path: Path) -> None:
    store_file = tmp_path / "cow"
    write(store_file, 8 * CHUNK, [(5 * CHUNK, chunk_data(5)), (9 * CHUNK, chunk_data(9))])
    image = store_file.read_bytes()
    assert struct.unpack_from("<4I", image, 0) == (MAGIC, 1, 1, SECTORS)
    assert image[16:CHUNK] == bytes(CHUNK - 16)
    assert struct.unpack_from("<4Q", image, CHUNK) == (5, 2, 9, 3)
    assert image[CHUNK + 32:2 * CHUNK] == bytes(CHUNK - 32)  # new_chunk 0 ends the list
    assert image[2 * CHUNK:3 * CHUNK] == chunk_data(5)
    assert image[3 * CHUNK:4 * CHUNK] == chunk_data(9)


def test_a_full_area_goes_on_in_the_next_one(tmp_path: Path) -> None:
    store_file = tmp_path / "cow"
    count = PER_AREA + 3
    chunks = [(n * CHUNK, chunk_data(n)) for n in range(count)]
    write(store_file, 600 * CHUNK, chunks)
    image = store_file.read_bytes()
    second_area = 1 + PER_AREA + 1  # chunk 258
    assert struct.unpack_from("<2Q", image, CHUNK + 16 * (PER_AREA - 1)) == \
        (PER_AREA - 1, 1 + PER_AREA)  # the last entry of area 0 fills it
    assert struct.unpack_from("<2Q", image, second_area * CHUNK) == (PER_AREA, second_area + 1)
    store = read(store_file)
    assert len(store.exceptions) == count
    assert all(new != second_area for _, new in store.exceptions)
    with open(store_file, "rb") as dev:
        assert list(read_chunks(dev, store)) == chunks


def test_an_exactly_full_area_is_followed_by_a_zeroed_metadata_chunk(tmp_path: Path) -> None:
    store_file = tmp_path / "cow"
    second_area = 1 + PER_AREA + 1
    store_file.write_bytes(b"\xff" * (600 * CHUNK))  # stale bytes from an older store
    with open(store_file, "r+b") as dev:
        used = write_store(dev, 600 * CHUNK, SECTORS,
                           [(n * CHUNK, chunk_data(n)) for n in range(PER_AREA)])
    assert used == (second_area + 1) * CHUNK
    image = store_file.read_bytes()
    assert image[second_area * CHUNK:(second_area + 1) * CHUNK] == bytes(CHUNK)
    assert len(read(store_file).exceptions) == PER_AREA


def test_the_last_exception_for_an_origin_chunk_wins_in_a_built_store() -> None:
    store = CowStore(SECTORS, ((4, 2), (1, 3), (4, 5)))
    assert store.changed() == [(1, 3), (4, 5)]


def test_a_stored_duplicate_is_refused(tmp_path: Path) -> None:
    # the kernel never writes one, and on load which copy a read sees is not defined
    store_file = craft(tmp_path / "cow", GOOD, {1: [(4, 2), (1, 3), (4, 5)]})
    with pytest.raises(CowError, match="exceptions 0 and 2 both name origin chunk 4"):
        read(store_file)


def test_a_new_store_reads_as_none(tmp_path: Path) -> None:
    store_file = tmp_path / "cow"
    store_file.write_bytes(bytes(16 * CHUNK))
    assert read_any(store_file) is None


def test_an_empty_store_is_loaded_not_initialized(tmp_path: Path) -> None:
    store_file = tmp_path / "cow"
    store_file.write_bytes(b"\xee" * (16 * CHUNK))
    with open(store_file, "r+b") as dev:
        write_empty(dev, SECTORS)
    image = store_file.read_bytes()
    assert struct.unpack_from("<4I", image, 0) == GOOD
    assert image[CHUNK:2 * CHUNK] == bytes(CHUNK)
    assert read(store_file) == CowStore(SECTORS, ())


def test_the_exceptions_may_end_exactly_at_an_areas_start(tmp_path: Path) -> None:
    full = [(n, 2 + n) for n in range(PER_AREA)]
    store_file = craft(tmp_path / "cow", GOOD, {1: full})
    assert read(store_file).exceptions == tuple(full)


@pytest.mark.parametrize(("header", "message"), [
    ((0x12345678, 1, 1, SECTORS), "not a snapshot store"),
    ((MAGIC, 1, 2, SECTORS), "version 2"),
    ((MAGIC, 0, 1, SECTORS), "invalidated"),
    ((MAGIC, 1, 1, 12), "not a power of two"),
    ((MAGIC, 1, 1, 0), "not a power of two"),
    ((MAGIC, 1, 1, 4), "outside 8..2048"),
    ((MAGIC, 1, 1, 4096), "outside 8..2048"),
])
def test_a_bad_header_is_refused(tmp_path: Path, header: tuple[int, int, int, int],
                                 message: str) -> None:
    store_file = craft(tmp_path / "cow", header, {})
    with pytest.raises(CowError, match=message):
        read(store_file)


@pytest.mark.parametrize(("areas", "message"), [
    ({1: [(0, 2), (1, 1)]}, "exception 1 points at metadata chunk 1"),
    ({1: [(0, 1 + PER_AREA + 1)]}, "exception 0 points at metadata chunk 258"),
    ({1: [(0, 600)]}, "exception 0 points outside the store"),
    ({1: [(0, 2**64 - 1)]}, "exception 0 points outside the store"),
    ({1: [(0, 2), (4096, 3)]}, "exception 1 names origin chunk 4096"),
    ({1: [(2**64 - 1, 2)]}, "past the origin's end"),
])
def test_a_hostile_exception_is_refused(tmp_path: Path, areas: dict[int, list[tuple[int, int]]],
                                        message: str) -> None:
    store_file = craft(tmp_path / "cow", GOOD, areas)
    with pytest.raises(CowError, match=message):
        read(store_file)


def test_an_origin_of_part_of_a_chunk_counts_that_chunk(tmp_path: Path) -> None:
    store_file = craft(tmp_path / "cow", GOOD, {1: [(2, 2)]})
    assert read(store_file, origin=2 * CHUNK + 1).exceptions == ((2, 2),)
    with pytest.raises(CowError, match="origin chunk 2"):
        read(store_file, origin=2 * CHUNK)


def test_full_areas_up_to_the_end_are_refused(tmp_path: Path) -> None:
    stride = PER_AREA + 1
    chunks = 1 + 2 * stride  # two areas exactly, no room for a third metadata chunk
    areas = {1 + a * stride: [(a * PER_AREA + i, 1 + a * stride + 1 + i)
                              for i in range(PER_AREA)] for a in range(2)}
    store_file = craft(tmp_path / "cow", GOOD, areas, chunks=chunks)
    with pytest.raises(CowError, match="past the end of the store"):
        read(store_file, origin=2 * PER_AREA * CHUNK)


def test_the_reader_stays_inside_the_size_it_is_given(tmp_path: Path) -> None:
    # the file is larger than the store: the exceptions point past the given size
    store_file = craft(tmp_path / "cow", GOOD, {1: [(0, 20)]}, chunks=64)
    with pytest.raises(CowError, match="outside the store"):
        read(store_file, size=16 * CHUNK)
    with pytest.raises(CowError, match="smaller than its header"):
        read(store_file, size=CHUNK + 100)
    with pytest.raises(CowError, match="too small"):
        read(store_file, size=8)


def test_a_store_shorter_than_its_size_is_refused(tmp_path: Path) -> None:
    store_file = tmp_path / "cow"
    store_file.write_bytes(struct.pack("<4I", *GOOD) + bytes(100))
    with pytest.raises(CowError, match="ends before byte"):
        read(store_file, size=64 * CHUNK)


def test_chunks_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    size = 40 * CHUNK
    fits = capacity(size, SECTORS)
    assert fits == 40 - 2
    chunks = [(n * CHUNK, chunk_data(n)) for n in range(fits + 1)]
    write(tmp_path / "fits", size, chunks[:fits])
    assert len(read(tmp_path / "fits").exceptions) == fits
    with pytest.raises(CowError, match="do not fit"):
        write(tmp_path / "too-many", size, chunks)
    with pytest.raises(CowError, match="cannot hold a header"):
        write(tmp_path / "tiny", CHUNK, [])


def test_a_last_full_area_needs_room_for_the_next_metadata_chunk(tmp_path: Path) -> None:
    size = (1 + PER_AREA + 1) * CHUNK  # header, area 0: no room for area 1's metadata
    assert capacity(size, SECTORS) == PER_AREA - 1
    chunks = [(n * CHUNK, chunk_data(n)) for n in range(PER_AREA)]
    with pytest.raises(CowError, match="do not fit"):
        write(tmp_path / "cow", size, chunks)
    write(tmp_path / "cow", size, chunks[:-1])
    assert len(read(tmp_path / "cow").exceptions) == PER_AREA - 1


def placed_end(count: int, chunk_sectors: int) -> int:
    """The highest chunk index a store of ``count`` chunks needs, from the layout rule."""
    per_area = chunk_sectors * 512 // 16
    if count == 0:
        return 1
    area, index = divmod(count - 1, per_area)
    last = 1 + area * (per_area + 1) + 1 + index
    return last + 1 if index == per_area - 1 else last


@pytest.mark.parametrize("sectors", [8, 16])
def test_capacity_is_the_most_chunks_the_layout_places(sectors: int) -> None:
    chunk_bytes = sectors * 512
    for store_chunks in range(0, 1600, 7):
        fits = capacity(store_chunks * chunk_bytes + 100, sectors)
        if store_chunks < 2:
            assert fits == 0
            continue
        assert placed_end(fits, sectors) < store_chunks
        assert placed_end(fits + 1, sectors) >= store_chunks


@pytest.mark.parametrize(("chunks", "message"), [
    ([(CHUNK + 1, chunk_data(1))], "not aligned"),
    ([(CHUNK, chunk_data(1)[:-1])], "holds 4095 bytes"),
    ([(2 * CHUNK, chunk_data(2)), (CHUNK, chunk_data(1))], "not in origin order"),
    ([(CHUNK, chunk_data(1)), (CHUNK, chunk_data(1))], "not in origin order"),
])
def test_chunks_to_write_are_checked(tmp_path: Path, chunks: list[tuple[int, bytes]],
                                     message: str) -> None:
    with pytest.raises(CowError, match=message):
        write(tmp_path / "cow", 64 * CHUNK, chunks)


def test_a_store_cut_short_reads_as_new(tmp_path: Path) -> None:
    store_file = tmp_path / "cow"
    write(store_file, 64 * CHUNK, [(CHUNK, chunk_data(1))])

    def crash():
        yield 2 * CHUNK, chunk_data(2)
        raise OSError("the seat lost power")

    with open(store_file, "r+b") as dev, pytest.raises(OSError):
        write_store(dev, 64 * CHUNK, SECTORS, crash())
    assert read_any(store_file) is None


def test_larger_chunks_round_trip(tmp_path: Path) -> None:
    sectors = 2048
    chunk_bytes = sectors * 512
    chunks = [(5 * chunk_bytes, b"\x01" * chunk_bytes)]
    write(tmp_path / "cow", 8 * chunk_bytes, chunks, sectors=sectors)
    store = read(tmp_path / "cow", origin=10 * chunk_bytes)
    assert store == CowStore(sectors, ((5, 2),))
    with open(tmp_path / "cow", "rb") as dev:
        assert list(read_chunks(dev, store)) == chunks
