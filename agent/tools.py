"""Running the ramdisk's command-line tools (parted, wipefs, losetup, mount, extlinux, poweroff)."""
from __future__ import annotations

import subprocess


def run(argv: list[str]) -> str:
    """The tool's output; a failure raises with the tool's own words."""
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): "
                           f"{(result.stderr or result.stdout).strip()}")
    return result.stdout
