"""Fixtures shared by the tests, and the two tiers.

The fast tier is every test marked `fast` (`pytestmark = pytest.mark.fast` at the top of a
module): pure code only, the hash ring, states, the iPXE/GRUB/DHCP renderers, manifests, wire
formats, the policy, request validation. Such a module needs no root, no network (at most an
in-process server on loopback), no QEMU, no tgtd and starts no service; it runs in seconds as
any user (`.venv/bin/pytest -m fast`). A module is fast as a whole: a pure test written in a
slow module moves to a fast one. `./dev.sh test` runs the fast tier first, then the rest
(`-m "not fast"`), as root.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from labmetal.lab.harness import Baremetal, Processes, start_postgres


@pytest.fixture
def procs(tmp_path: Path):
    processes = Processes(tmp_path)
    yield processes
    processes.stop_all()


@pytest.fixture
def baremetal_for(tmp_path: Path):
    def make(url: str, user: str | None = None, password: str | None = None) -> Baremetal:
        home = tmp_path / f"home-{user or 'anonymous'}"
        home.mkdir(exist_ok=True)
        return Baremetal(url, home, user, password)
    return make


@pytest.fixture(scope="session")
def postgres():
    server = start_postgres()
    yield server
    server.stop()


@pytest.fixture(scope="session", autouse=True)
def need_tools(request):
    if all(item.get_closest_marker("fast") for item in request.session.items):
        return  # the fast tier needs no tools
    missing = [tool for tool in ("ipmitool",) if shutil.which(tool) is None]
    if missing:
        pytest.exit(f"missing test tools: {', '.join(missing)} (the README's test command "
                    "installs them)", returncode=3)
