"""A host executable carried into an initramfs with the shared libraries it loads: how
labmetal's session initramfs gets dmsetup (images/session_initramfs.py) and the simulated
lab's test images get iscsistart (lab/osimage.py), from the same Debian release as the
host. Kept apart from the deploy ramdisk's builder, whose own bytes name its builds."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

LOADER = "ld-linux-x86-64.so.2"
_LINKED = re.compile(r"(?:=>\s*)?(/\S+) \(0x")


class MissingLibrary(RuntimeError):
    """The executable needs a library this host lacks."""


def with_libraries(binary: Path, into: str, library_path: list[str] | None = None
                   ) -> dict[str, bytes]:
    """``binary`` and the libraries ``ldd`` says it loads (also looking in
    ``library_path``), by their path in the initramfs: ``into`` for the executable,
    libraries in /lib, the loader in /lib64."""
    env = {"LC_ALL": "C", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    if library_path:
        env["LD_LIBRARY_PATH"] = ":".join(library_path)
    linked = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True,
                            timeout=30, env=env).stdout
    files = {into: binary.read_bytes()}
    for line in linked.splitlines():
        found = _LINKED.search(line)
        if found is None:
            if "not found" in line:
                raise MissingLibrary(f"{binary.name} needs a library this host lacks: "
                                     f"{line.strip()}")
            continue
        path = Path(found.group(1))
        target = f"/lib64/{LOADER}" if path.name == LOADER else f"/lib/{path.name}"
        files[target] = path.resolve().read_bytes()
    return files
