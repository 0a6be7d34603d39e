"""A seat reading and writing a session's disk as an iSCSI initiator: qemu-io over libiscsi,
with the session's CHAP account and the seat's initiator name (what the target's ACL
checks)."""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path



@dataclass
class IscsiSeat:
    initiator: str
    portal: str
    iqn: str
    chap_user: str
    secret_file: Path  # the CHAP secret, as qemu reads secrets
    lun: int = 1

    def argv(self, *commands: str, initiator: str | None = None) -> list[str]:
        """qemu-io logged in as this seat (``initiator``: pretend to be another)."""
        opts = ",".join(["driver=iscsi", "transport=tcp", f"portal={self.portal}",
                         f"target={self.iqn}", f"lun={self.lun}", f"user={self.chap_user}",
                         "password-secret=chap",
                         f"initiator-name={initiator or self.initiator}"])
        return ["qemu-io", "--object", f"secret,id=chap,file={self.secret_file}",
                "--image-opts", opts, *(arg for command in commands for arg in ("-c", command))]

    def io(self, command: str, initiator: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(command, initiator=initiator), capture_output=True,
                              text=True, timeout=120)

    def write(self, byte: int, offset: int, length: int) -> None:
        result = self.io(f"write -P {byte:#x} {offset} {length}")
        assert result.returncode == 0 and "wrote" in result.stdout, result.stderr

    def holds(self, byte: int, offset: int, length: int) -> bool:
        result = self.io(f"read -P {byte:#x} {offset} {length}")
        assert "Pattern verification failed" in result.stdout or result.returncode == 0, \
            result.stdout + result.stderr
        return result.returncode == 0
