"""Ironic's API microversions: the client names a version per request (or "latest"); every
response carries the supported range; a version outside it is refused with 406."""
from __future__ import annotations

import re

MIN_VERSION = (1, 1)
# 1.78 brings node history, the newest feature labmetal serves; later Ironic features
# (allocations, shards, ...) are not offered, so a negotiating client stays below them.
MAX_VERSION = (1, 78)
HEADER = "X-OpenStack-Ironic-API-Version"
MIN_HEADER = "X-OpenStack-Ironic-API-Minimum-Version"
MAX_HEADER = "X-OpenStack-Ironic-API-Maximum-Version"

_PATTERN = re.compile(r"^\s*(\d+)\.(\d+)\s*$")


class VersionError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def text(version: tuple[int, int]) -> str:
    return f"{version[0]}.{version[1]}"


def requested(ironic_header: str | None, openstack_header: str | None) -> tuple[int, int]:
    """The version a request asks for; the default is the minimum, as in Ironic."""
    value = ironic_header
    if value is None and openstack_header:
        service, _, value = openstack_header.strip().partition(" ")
        if service.lower() != "baremetal":
            value = None
    if value is None:
        return MIN_VERSION
    if value.strip().lower() == "latest":
        return MAX_VERSION
    match = _PATTERN.match(value)
    if not match:
        raise VersionError(400, f"Invalid value for {HEADER} header: {value!r}")
    version = (int(match.group(1)), int(match.group(2)))
    if not MIN_VERSION <= version <= MAX_VERSION:
        raise VersionError(406, f"Version {text(version)} was requested but the minimum and "
                                f"maximum supported versions are {text(MIN_VERSION)} and "
                                f"{text(MAX_VERSION)}.")
    return version
