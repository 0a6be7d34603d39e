"""The commands the conductor sends to the seat, and what each one does.

Each command runs in its own thread and is kept with its progress and outcome for the
conductor to poll. A command is found again by its request_id (a conductor that took a
node over re-sends what its predecessor sent), and only one command writes to the disk
at a time. Each command's params are a typed class (agent/command_params.py), the one the
conductor builds them from; an image is written by the one pipeline (agent/writer.py)
whatever its chunk source.
"""
from __future__ import annotations

import importlib
import logging
import os
import threading
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import requests

from labmetal.agent import bootloader, fetch, partition, power, proof, seat_cache, wipe, writer
from labmetal.agent import command_params as cp
from labmetal.agent.disk import as_block_device
from labmetal.agent.identity import Identity
from labmetal.agent.manifest import Manifest
from labmetal.agent.writer import Progress

LOG = logging.getLogger(__name__)

# The agent's own copy: the ramdisk carries this package alone. It must match the
# server's labmetal/names.py IQN_PREFIX (tests/test_lifecycles.py checks it).
IQN_PREFIX = "iqn.2026-11.org.labmetal"

DISK_WRITERS = frozenset({cp.WriteImage.command, cp.DeployPartitionImage.command,
                          cp.InstallBootloader.command, cp.WipeMetadata.command})


class Refused(Exception):
    """A command request turned down before anything ran; ``status`` is the HTTP answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Command:
    id: str
    name: str
    request_id: str
    params: dict[str, Any]
    status: str = "running"  # then "succeeded" or "failed"
    progress: Progress = field(default_factory=Progress)
    error: str | None = None
    result: dict[str, Any] | None = None

    def view(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "request_id": self.request_id,
                "status": self.status, "progress": asdict(self.progress),
                "error": self.error, "result": self.result}


@dataclass(frozen=True)
class Seat:
    """What the commands act on, from the agent's options."""
    disk: str | None
    poweroff_cmd: list[str]
    reboot_cmd: list[str]
    address: Callable[[], str]  # where labmetal reaches this seat (the iSCSI portal's default)


class Commands:
    def __init__(self, seat: Seat, identity: Identity) -> None:
        self.seat = seat
        self.identity = identity
        self._by_id: dict[str, Command] = {}
        self._by_request: dict[str, Command] = {}
        self._lock = threading.Lock()
        self._iscsi: Any = None
        self._iscsi_lock = threading.Lock()
        # Where the last image went (the disk, and the byte its first byte is at): what a
        # prove_disk challenge reads.
        self._written: tuple[str, int] | None = None
        self._layout: partition.Layout | None = None  # of the last partition image
        # Each handler gets the command (for its progress) and its params, typed.
        self._handlers: dict[str, Callable[[Command, Any], dict[str, Any]]] = {
            cp.WriteImage.command: self._write_image,
            cp.DeployPartitionImage.command: self._deploy_partition_image,
            cp.WipeMetadata.command: self._wipe_metadata,
            cp.PowerOff.command: lambda command, params: power.run(self.seat.poweroff_cmd),
            cp.Reboot.command: lambda command, params: power.run(self.seat.reboot_cmd),
            cp.ExportIscsi.command: self._export_iscsi,
            cp.UnexportIscsi.command: self._unexport_iscsi,
            cp.ProveDisk.command: self._prove_disk,
            cp.InstallBootloader.command: self._install_bootloader,
        }

    def submit(self, name: str, params: dict[str, Any], request_id: str) -> tuple[Command, bool]:
        """The command for ``request_id`` and whether it is new; a new one is started by ``start``
        once the conductor has its answer."""
        if name not in cp.COMMANDS:
            raise Refused(400, f"unknown command {name!r}; known: {', '.join(cp.COMMANDS)}")
        missing = cp.missing(cp.COMMANDS[name].required, params)
        if missing:
            raise Refused(400, f"{name} needs params: {', '.join(missing)}")
        with self._lock:
            existing = self._by_request.get(request_id)
            if existing is not None:
                return existing, False
            busy = next((c for c in self._by_id.values()
                         if c.name in DISK_WRITERS and c.status == "running"), None)
            if name in DISK_WRITERS and busy is not None:
                raise Refused(409, f"{busy.name} (command {busy.id}) is still writing to the disk")
            command = Command(uuid.uuid4().hex, name, request_id, params)
            self._by_id[command.id] = self._by_request[request_id] = command
        return command, True

    def start(self, command: Command) -> None:
        threading.Thread(target=self._run, args=(command,), name=f"command-{command.name}",
                         daemon=True).start()

    def get(self, command_id: str) -> Command | None:
        return self._by_id.get(command_id)

    def all(self) -> list[Command]:
        with self._lock:
            return list(self._by_id.values())

    def _run(self, command: Command) -> None:
        LOG.info("command %s (%s) started", command.name, command.id)
        try:  # params that are there but wrong fail the command, with the reason
            params = cp.COMMANDS[command.name].from_dict(command.params)
            command.result = self._handlers[command.name](command, params)
            command.status = "succeeded"
            LOG.info("command %s (%s) succeeded", command.name, command.id)
        except Exception as error:  # a failed command is reported, never fatal to the agent
            command.error = str(error) or type(error).__name__
            command.status = "failed"
            LOG.error("command %s (%s) failed: %s", command.name, command.id, command.error)
            LOG.debug("command %s (%s) failed here:", command.name, command.id, exc_info=True)

    def _disk(self) -> str:
        if self.seat.disk is None:
            raise RuntimeError("this seat has no install disk (none of 4 GiB or more; see --disk)")
        return self.seat.disk

    def _write_image(self, command: Command, params: cp.WriteImage) -> dict[str, Any]:
        session = requests.Session()
        manifest = fetch.manifest(session, params.manifest_url)
        seat_cache.check_room_image(self._disk(), manifest.raw_size)  # keeps the cache
        self._written = None
        result = asdict(self._write(command, params, session, manifest, self._disk()))
        self._written = (self._disk(), 0)
        return result

    @staticmethod
    def _write(command: Command, params: cp.WriteImage, session: requests.Session,
               manifest: Manifest, target: str) -> writer.WriteResult:
        """The image onto ``target`` through the one pipeline, its chunks over HTTP or from
        a room job's multicast group (the chunks the disk already holds are kept either
        way, unless delta is off)."""
        source = writer.chunk_source(session, params.packed_url, params.multicast)
        return writer.write(manifest, source, target, command.progress,
                            None if params.delta else frozenset())

    def _deploy_partition_image(self, command: Command,
                                params: cp.DeployPartitionImage) -> dict[str, Any]:
        """The partition layout for the boot mode and the image into its root partition.
        The boot loader comes with ``install_bootloader``, once the conductor has checked
        the receipt: installing it changes the root file system, the image's bytes."""
        boot_mode = params.boot_mode
        if boot_mode == "auto":  # as this PC booted the ramdisk
            boot_mode = "uefi" if os.path.isdir("/sys/firmware/efi") else "bios"
        session = requests.Session()
        manifest = fetch.manifest(session, params.manifest_url)
        target = self._disk()
        writer.check_fits(target, partition.disk_needed(manifest.raw_size, boot_mode))
        seat_cache.check_room_image(target, partition.disk_needed(manifest.raw_size,
                                                                  boot_mode))
        self._written = self._layout = None
        with as_block_device(target) as device:
            wipe.wipe_metadata(device)
            # Delta stays valid here: the root partition is made again at the same place
            # for the same boot mode, and the scan runs after wipe_metadata, so whatever the
            # wipe erased inside the partition (the file system's magic) fails its check.
            if boot_mode == "uefi":
                esp, root = partition.make_uefi_layout(device, manifest.raw_size)
            else:
                esp, root = None, partition.make_root_partition(device, manifest.raw_size)
            written = self._write(command, params, session, manifest, root.node)
        self._written = (target, root.start)
        self._layout = partition.Layout(boot_mode, esp, root)
        return {**asdict(written), "boot_mode": boot_mode, "partition": {
            "number": self._layout.root_number, "start": root.start, "size": root.size}}

    def _install_bootloader(self, command: Command,
                            params: cp.InstallBootloader) -> dict[str, Any]:
        """The kernel, initrd and boot loader of the partition image just written: extlinux
        and MBR code on BIOS, signed shim and GRUB on the EFI system partition on UEFI."""
        layout = self._layout
        if layout is None:
            raise RuntimeError("no partition image was written since this agent started")
        session = requests.Session()
        kernel, ramdisk, cmdline = params.kernel_url, params.ramdisk_url, params.kernel_cmdline
        self._written = None  # the root file system changes now: no receipt of it after
        with as_block_device(self._disk()) as device:
            esp, root = layout.on(device)
            if esp is not None:
                return bootloader.install_uefi(session, esp, root, kernel, ramdisk, cmdline)
            return bootloader.install(session, device, root, kernel, ramdisk, cmdline)

    def _prove_disk(self, command: Command, params: cp.ProveDisk) -> dict[str, Any]:
        """The receipt of the last write: the challenge's HMAC over the disk's bytes."""
        if self._written is None:
            raise RuntimeError("no image was written since this agent started")
        disk, base = self._written
        return {"hmac": proof.digest(disk, base, params.challenge)}

    def _wipe_metadata(self, command: Command, params: cp.WipeMetadata) -> dict[str, Any]:
        self._written = self._layout = None
        with as_block_device(self._disk()) as device:
            return {"erased": wipe.wipe_metadata(device)}

    def _export_iscsi(self, command: Command, params: cp.ExportIscsi) -> dict[str, Any]:
        export = self._iscsi_exporter().export(
            self._disk(), self._iqn(params.iqn), params.portal_ip or self.seat.address(),
            params.port, params.allowed_initiators)
        return asdict(export)

    def _unexport_iscsi(self, command: Command, params: cp.UnexportIscsi) -> dict[str, Any]:
        iqn = self._iqn(params.iqn)
        self._iscsi_exporter().unexport(iqn)
        return {"iqn": iqn}

    def _iqn(self, iqn: str | None) -> str:
        return iqn or f"{IQN_PREFIX}:{self.identity.node_uuid}"

    def close(self) -> None:
        """Remove the iSCSI exports: the exporter's daemon would outlive the agent."""
        with self._iscsi_lock:
            if self._iscsi is not None:
                self._iscsi.close()
                self._iscsi = None

    def _iscsi_exporter(self) -> Any:
        """Imported on first use: the export lives in its own module, with its own tools."""
        with self._iscsi_lock:
            if self._iscsi is None:
                try:
                    iscsi = importlib.import_module("labmetal.agent.iscsi")
                except ImportError as error:
                    raise RuntimeError(f"iSCSI export is not available in this agent: {error}") \
                        from None
                self._iscsi = iscsi.exporter_for_host()
            return self._iscsi
