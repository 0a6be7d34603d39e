"""The main job: `labmetal demo` provisions a simulated room end to end (real PXE boots of
QEMU seats, light seats, the real deploy ramdisk), then stops (--once)."""
import re
import subprocess

import pytest

from tests.support import LABMETAL, free_port

pytestmark = pytest.mark.ramdisk


def test_demo_deploys_every_seat_and_the_qemu_seat_boots_the_os(tmp_path):
    result = subprocess.run([LABMETAL, "demo", "--qemu", "1", "--light", "1", "--once",
                             "--subnet", "10.99.201.0/24", "--port", str(free_port()),
                             "--state-dir", str(tmp_path / "demo")],
                            capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "2/2 seats deployed in" in result.stdout
    assert re.search(r"demo-pc1 \(QEMU\) booted the deployed OS: labmetal-os: image=demo-os "
                     r"mac=52:54:00:63:c9:01 booted", result.stdout), result.stdout
    assert "room demo is down" in (tmp_path / "demo" / "room.log").read_text()
