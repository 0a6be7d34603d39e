"""The HTTP chunk source of the image pipeline (agent/writer.py): the manifest, then the
packed chunks off HTTP streams.

The packed file holds the data chunks back to back in manifest order, so one GET delivers
them all. A delta re-image wants only some of them: each run of wanted chunks that lie back
to back in the packed file is one Range request (on the same kept-alive connection), so
what crosses the network is what the disk lacks. When a connection breaks, the stream
resumes with a Range request at the first chunk not yet delivered: a break costs at most
one chunk, never the whole image.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Generator

import requests
import urllib3

from labmetal.agent.manifest import Chunk, Manifest

if TYPE_CHECKING:
    from labmetal.agent.writer import Handoff

LOG = logging.getLogger(__name__)

TIMEOUT = (10, 60)  # connect, read (seconds)
# A broken download is resumed for this long (each time labmetal answered nothing or a
# 5xx), waiting up to RESUME_DELAY_MAX between tries: labmetal's API restarting (its front
# answering 502/503, or nothing) for up to a quarter of an hour costs a downloading seat
# nothing; it used to give up after 7.5 s.
RESUME_WINDOW = 900.0
RESUME_DELAY_MAX = 10.0
FETCH_AHEAD = 8  # chunks received ahead of the writes (compressed, 4 MiB at most each)


class FetchError(RuntimeError):
    pass


class _Broken(Exception):
    """A stream that may work again when resumed."""


_BROKEN = (OSError, urllib3.exceptions.HTTPError, _Broken)  # requests' errors are OSErrors


def manifest(session: requests.Session, url: str) -> Manifest:
    failures, since = 0, time.monotonic()
    while True:
        try:
            response = session.get(url, timeout=TIMEOUT)
            if response.status_code < 500:
                break
            error: object = f"HTTP {response.status_code}"
        except _BROKEN as broken:
            error = broken
        failures += 1
        _pause(f"manifest {url}", error, failures, since)
    if response.status_code != 200:
        raise FetchError(f"manifest {url}: HTTP {response.status_code}")
    return Manifest.from_json(response.content)


def _pause(what: str, error: object, failures: int, since: float) -> None:
    """Wait before trying ``what`` again (doubling, at most RESUME_DELAY_MAX), or give up
    with FetchError once it has failed for RESUME_WINDOW seconds."""
    if time.monotonic() - since > RESUME_WINDOW:
        raise FetchError(f"{what}: gave up after {RESUME_WINDOW:.0f} s of failures: {error}")
    delay = min(0.5 * 2 ** (failures - 1), RESUME_DELAY_MAX)
    LOG.warning("%s failed (%s); trying again in %.1f s", what, error, delay)
    time.sleep(delay)


def download(session: requests.Session, url: str, target: Path) -> int:
    """A whole file (kernel, initrd) to ``target``; returns its size."""
    size = 0
    with session.get(url, stream=True, timeout=TIMEOUT) as response:
        if response.status_code != 200:
            raise FetchError(f"{url}: HTTP {response.status_code}")
        with open(target, "wb") as out:
            for block in response.iter_content(1024 * 1024):
                out.write(block)
                size += len(block)
    return size


class HttpChunks:
    """A chunk source: the image's packed file at ``url``, asked on ``session`` (the one the
    manifest came on, so it is one kept-alive connection)."""
    ahead = FETCH_AHEAD

    def __init__(self, session: requests.Session, url: str) -> None:
        self.session = session
        self.url = url

    def deliver(self, manifest: Manifest, wanted: list[Chunk], handoff: Handoff) -> None:
        stream = packed_chunks(self.session, self.url, wanted, manifest.packed_size)
        try:
            for chunk, packed in stream:
                handoff.put(chunk, packed)
        finally:
            stream.close()  # its HTTP response with it, also when the writes failed

    def finish(self, ok: bool, reason: str) -> None:
        pass  # nothing held: the session belongs to the caller


def packed_chunks(session: requests.Session, url: str, chunks: list[Chunk],
                  packed_size: int | None = None) -> Generator[tuple[Chunk, bytes], None, None]:
    """(chunk, compressed bytes) for each of ``chunks`` (in manifest order, any subset) in
    order; zero chunks come with b"" and cost no transfer. ``packed_size``, the packed file's
    size, lets a run that goes to the end of the file be asked open-ended (``bytes=N-``, or
    no Range at all from 0), as a plain stream; other runs are asked with both ends."""
    position = failures = 0
    broken_since = 0.0  # when the current run of failures began
    response: requests.Response | None = None
    delivers = 0  # the packed offset the open response delivers next
    try:
        while position < len(chunks):
            chunk = chunks[position]
            if chunk.zero:
                position += 1
                yield chunk, b""
                continue
            try:
                if response is not None and delivers != chunk.packed_offset:
                    _finish(response)  # the run before is all read: the connection stays up
                    response = None
                if response is None:
                    end = _run_end(chunks, position)
                    response = _open(session, url, chunk.packed_offset,
                                     None if end == packed_size else end)
                    delivers = chunk.packed_offset
                data = _read_exactly(response.raw, chunk.packed_length)
                delivers += chunk.packed_length
            except _BROKEN as error:
                if response is not None:
                    response.close()
                    response = None
                failures += 1
                broken_since = broken_since or time.monotonic()
                _pause(f"stream of {url} before chunk {chunk.index} (resumed with a Range "
                       "request)", error, failures, broken_since)
                continue
            position += 1
            failures, broken_since = 0, 0.0
            yield chunk, data
    finally:
        if response is not None:
            response.close()


def _run_end(chunks: list[Chunk], position: int) -> int:
    """Where the run of back-to-back data chunks starting at ``chunks[position]`` ends in
    the packed file (zero chunks are not stored there, so they never break a run)."""
    end = chunks[position].packed_offset
    for chunk in chunks[position:]:
        if chunk.zero:
            continue
        if chunk.packed_offset != end:
            break
        end += chunk.packed_length
    return end


def _open(session: requests.Session, url: str, start: int,
          end: int | None = None) -> requests.Response:
    """The packed file from ``start`` to ``end`` (excluded), or to its end when None."""
    wanted = f"bytes={start}-{'' if end is None else end - 1}"
    ranged = start > 0 or end is not None
    response = session.get(url, headers={"Range": wanted} if ranged else {},
                           stream=True, timeout=TIMEOUT)
    expected = 206 if ranged else 200
    if response.status_code == expected:
        return response
    response.close()
    if response.status_code >= 500:
        raise _Broken(f"HTTP {response.status_code}")
    raise FetchError(f"{url}: HTTP {response.status_code} (expected {expected} for "
                     f"{wanted})")


def _finish(response: requests.Response) -> None:
    """Read the (empty) rest of a run's body, so that the connection goes back to the pool
    for the next run instead of being closed."""
    try:
        response.raw.read(decode_content=False)
    except _BROKEN:
        pass
    response.close()


def _read_exactly(raw: urllib3.response.HTTPResponse, length: int) -> bytes:
    data = raw.read(length, decode_content=False)
    while len(data) < length:
        more = raw.read(length - len(data), decode_content=False)
        if not more:
            raise _Broken(f"connection closed after {len(data)} of {length} bytes")
        data += more
    return data
