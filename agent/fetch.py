"""The first stage of the image pipeline: the manifest, then the packed chunks off one HTTP stream.

The packed file holds the data chunks back to back in manifest order, so one GET delivers
them all. When the connection breaks, the stream resumes with a Range request at the
first chunk not yet delivered: a break costs at most one chunk, never the whole image.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterator

import requests
import urllib3

from labmetal.images.manifest import Chunk, Manifest

LOG = logging.getLogger(__name__)

TIMEOUT = (10, 60)  # connect, read (seconds)
RESUME_ATTEMPTS = 5


class FetchError(RuntimeError):
    pass


class _Broken(Exception):
    """A stream that may work again when resumed."""


_BROKEN = (OSError, urllib3.exceptions.HTTPError, _Broken)  # requests' errors are OSErrors


def manifest(session: requests.Session, url: str) -> Manifest:
    response = session.get(url, timeout=TIMEOUT)
    if response.status_code != 200:
        raise FetchError(f"manifest {url}: HTTP {response.status_code}")
    return Manifest.from_json(response.content)


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


def packed_chunks(session: requests.Session, url: str,
                  chunks: list[Chunk]) -> Iterator[tuple[Chunk, bytes]]:
    """(chunk, compressed bytes) for every chunk in order; zero chunks come with b"" and cost
    no transfer. The first data chunk opens the stream."""
    position = failures = 0
    response: requests.Response | None = None
    try:
        while position < len(chunks):
            chunk = chunks[position]
            if chunk.zero:
                position += 1
                yield chunk, b""
                continue
            try:
                if response is None:
                    response = _open(session, url, chunk.packed_offset)
                data = _read_exactly(response.raw, chunk.packed_length)
            except _BROKEN as error:
                if response is not None:
                    response.close()
                    response = None
                failures += 1
                if failures > RESUME_ATTEMPTS:
                    raise FetchError(f"{url}: gave up at chunk {chunk.index} after "
                                     f"{RESUME_ATTEMPTS} resumes: {error}") from None
                LOG.warning("stream of %s broke before chunk %d (%s); resuming with a Range "
                            "request", url, chunk.index, error)
                time.sleep(0.5 * failures)
                continue
            position += 1
            failures = 0
            yield chunk, data
    finally:
        if response is not None:
            response.close()


def _open(session: requests.Session, url: str, start: int) -> requests.Response:
    response = session.get(url, headers={"Range": f"bytes={start}-"} if start else {},
                           stream=True, timeout=TIMEOUT)
    expected = 206 if start else 200
    if response.status_code == expected:
        return response
    response.close()
    if response.status_code >= 500:
        raise _Broken(f"HTTP {response.status_code}")
    raise FetchError(f"{url}: HTTP {response.status_code} (expected {expected} for bytes "
                     f"{start}-)")


def _read_exactly(raw: urllib3.response.HTTPResponse, length: int) -> bytes:
    data = raw.read(length, decode_content=False)
    while len(data) < length:
        more = raw.read(length - len(data), decode_content=False)
        if not more:
            raise _Broken(f"connection closed after {len(data)} of {length} bytes")
        data += more
    return data
