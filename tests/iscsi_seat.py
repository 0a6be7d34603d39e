"""The storage tests' tools, checked once (import the fixture into the test module); the
iSCSI seat itself is the simulated lab's (lab/iscsi_seat.py), which the benchmarks use too."""
from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="module", autouse=True)
def storage_tools():
    """The storage tests' tools, checked once (import this fixture into the test module)."""
    missing = [t for t in ("tgtd", "tgtadm", "qemu-img", "qemu-io", "qemu-storage-daemon")
               if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: install the Debian packages tgt, "
                    "qemu-utils, qemu-block-extra, qemu-system-common")
