"""The agent is one self-contained package: the deploy ramdisk carries ``labmetal.agent``
whole and nothing else of labmetal, so every import in it must be its own package, the
standard library, or a library the ramdisk installs from Debian. (Fast: reads the sources
only. ``test_ramdisk.py`` imports every module inside the built image as well.)"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from labmetal.images.ramdisk import PACKAGES, agent_package

pytestmark = pytest.mark.fast

AGENT = Path(__file__).resolve().parents[1] / "agent"
# Import names of the Python libraries the ramdisk's Debian packages provide.
FROM_DEBIAN = {"requests": "python3-requests", "urllib3": "python3-requests",
               "pyudev": "python3-pyudev", "zstandard": "python3-zstandard",
               "zfec": "python3-zfec"}
# Imported only where present, the agent falling back without it: rtslib-fb (LIO) on a
# ramdisk that carries it; this one exports disks with tgtd (agent/iscsi.py).
OPTIONAL = {"rtslib_fb"}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_installed_agent_is_this_checkouts_agent_folder():
    assert agent_package() == AGENT


def test_every_agent_import_is_its_own_package_the_stdlib_or_a_ramdisk_package():
    outside = []
    for path in sorted(AGENT.rglob("*.py")):
        for name in imported_modules(path):
            top = name.split(".")[0]
            if name.startswith("labmetal.agent") or top in sys.stdlib_module_names | OPTIONAL:
                continue
            if top == "labmetal":  # anything of labmetal but the agent is not in the ramdisk
                outside.append(f"{path.name}: {name}")
            elif top not in FROM_DEBIAN:
                outside.append(f"{path.name}: {name} (no Debian package in the ramdisk)")
            elif FROM_DEBIAN[top] not in PACKAGES:
                outside.append(f"{path.name}: {name} ({FROM_DEBIAN[top]} not in the recipe)")
    assert not outside, "the ramdisk would lack: " + "; ".join(outside)


def test_the_check_sees_an_import_from_outside_the_package(tmp_path):
    module = tmp_path / "leaky.py"
    module.write_text("from labmetal.images import multicast_wire\nimport flask\n")
    names = imported_modules(module)
    assert "labmetal.images.multicast_wire" in names and "flask" in names
