from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support import Baremetal, Processes, start_postgres


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
def need_tools():
    missing = [tool for tool in ("ipmitool",) if shutil.which(tool) is None]
    if missing:
        pytest.exit(f"missing test tools: {', '.join(missing)} (the README's test command "
                    "installs them)", returncode=3)
