"""Fixtures the light-seat deploy tests share (import them into the test module); the room
itself is the simulated lab's (lab/light_room.py), which the benchmarks use too."""
from __future__ import annotations

from pathlib import Path

import pytest

from labmetal.lab.light_room import make_whole_disk
from labmetal.lab.network import Lab


@pytest.fixture
def lab():
    with Lab() as made:
        yield made


@pytest.fixture(scope="module")
def disk_image(tmp_path_factory) -> Path:
    """A 40 MiB whole-disk image, built once per test module."""
    return make_whole_disk(tmp_path_factory.mktemp("images"), size_mib=40)
