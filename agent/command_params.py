"""The parameters of the agent's commands, as typed values that both ends of the wire share.

The conductor builds them (conductor/deploy.py, conductor/deploy_interfaces.py) and sends
``to_dict()``; the agent reads the JSON back with ``from_dict()`` (agent/commands.py), so a
field is spelled in one place, not once per side. ``from_dict`` checks what it reads: a
missing field, a wrong type or a value out of range is a ParamsError that names the
command and the field. Keys a command does not know are left alone, as they always were:
a newer conductor may send more than an older ramdisk reads.

Two levels of "bad", as before: a required field that is absent or empty makes the agent
refuse the request (HTTP 400, ``missing``); anything else wrong makes the command fail
with the error as its message (the conductor polls it and shows it).

The multicast group a room job chose travels the same way: the room job stores
``MulticastGroup.to_dict()`` in the job and in each seat's instance_info, the deploy reads it
back with ``from_dict`` and sends it inside ``write_image``. It is the agent's package that
holds these classes because the agent may import nothing of the conductor (the ramdisk
carries this package alone); the conductor imports them from here.
"""
from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Protocol, TypeVar, cast

from labmetal.agent.proof import Challenge

BOOT_MODES = ("auto", "bios", "uefi")
T = TypeVar("T")


class ParamsError(ValueError):
    """Params a command cannot run with; the message names the command and the field."""


class CommandParams(Protocol):
    """What every command's params class offers."""
    command: ClassVar[str]
    required: ClassVar[tuple[str, ...]]

    def to_dict(self) -> dict[str, Any]: ...


def missing(required: tuple[str, ...], data: dict[str, Any]) -> list[str]:
    """The required fields that are absent or empty: the agent refuses such a request."""
    return [key for key in required if not data.get(key)]


class _Reader:
    """Typed reads of one command's JSON params, each failure a ParamsError naming both."""

    def __init__(self, command: str, data: object) -> None:
        if not isinstance(data, dict):
            raise ParamsError(f"{command}: params must be a JSON object")
        self.command = command
        self.data = data

    def _value(self, key: str, required: bool) -> Any:
        value = self.data.get(key)
        if value is None and required:
            raise ParamsError(f"{self.command} needs param {key}")
        return value

    def _wrong(self, key: str, expected: str, value: object) -> ParamsError:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:60] + "..."
        return ParamsError(f"{self.command}: {key} must be {expected}, not {shown}")

    def text(self, key: str) -> str:
        value = self._value(key, True)
        if not isinstance(value, str) or not value:
            raise self._wrong(key, "a non-empty string", value)
        return value

    def optional_text(self, key: str) -> str | None:
        value = self._value(key, False)
        if value is not None and not (isinstance(value, str) and value):
            raise self._wrong(key, "a non-empty string", value)
        return value

    def text_or(self, key: str, default: str) -> str:
        value = self._value(key, False)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self._wrong(key, "a string", value)
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self._value(key, False)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._wrong(key, "true or false", value)
        return value

    def number(self, key: str, low: int, high: int, default: int | None = None) -> int:
        value = self._value(key, default is None)
        if value is None:
            return default  # type: ignore[return-value]  # required ones raised above
        if not (isinstance(value, int) and not isinstance(value, bool) and low <= value <= high):
            raise self._wrong(key, f"an integer from {low} to {high}", value)
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.text_or(key, default)
        if value not in choices:
            raise ParamsError(f"{self.command}: unknown {key} {value!r} "
                              f"({', '.join(choices[:-1])} or {choices[-1]})")
        return value

    def texts(self, key: str) -> tuple[str, ...] | None:
        value = self._value(key, False)
        if value is None:
            return None
        if not (isinstance(value, list) and all(isinstance(v, str) and v for v in value)):
            raise self._wrong(key, "a list of non-empty strings", value)
        return tuple(value)

    def nested(self, key: str, kind: type[T]) -> T | None:
        value = self._value(key, False)
        if value is None:
            return None
        return kind.from_dict(value, f"{self.command}: {key}")  # type: ignore[attr-defined]


def _as_dict(params: object) -> dict[str, Any]:
    """The JSON object sent: every field, but those left unset (None) out."""
    return {key: value for key, value in asdict(params).items()  # type: ignore[call-overload]
            if value is not None}


@dataclass(frozen=True)
class MulticastGroup:
    """Where a room job's seats receive the image from: the job's group and data port, the
    sender's request address (``host:port``), the conductor's address it sends from, and the
    job's id (the session every packet carries, agent/multicast_wire.py)."""
    group: str
    port: int
    sender: str
    interface: str
    job: int

    @property
    def sender_address(self) -> tuple[str, int]:
        host, _, port = self.sender.rpartition(":")
        return host, int(port)

    @property
    def sender_port(self) -> int:
        return self.sender_address[1]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object, what: str = "multicast") -> MulticastGroup:
        read = _Reader(what, data)
        group = read.text("group")
        try:
            multicast = ipaddress.IPv4Address(group).is_multicast
        except ValueError:
            multicast = False
        if not multicast:
            raise ParamsError(f"{what}: group must be an IPv4 multicast address, not {group!r}")
        sender = read.text("sender")
        host, _, port = sender.rpartition(":")
        if not (host and port.isdigit() and 0 < int(port) < 65536):
            raise ParamsError(f"{what}: sender must be host:port, not {sender!r}")
        return cls(group, read.number("port", 1, 65535), sender, read.text("interface"),
                   read.number("job", 0, 2 ** 63))


@dataclass(frozen=True)
class WriteImage:
    """write_image: a whole-disk image onto the install disk, from its first byte. The chunks
    come over HTTP from ``packed_url``, or from the room job's ``multicast`` group; with
    ``delta`` those the disk already holds are kept. ``readback`` is read and ignored: it
    asked for the whole image to be read back from the disk, which every write now does."""
    command: ClassVar[str] = "write_image"
    required: ClassVar[tuple[str, ...]] = ("manifest_url", "packed_url")
    manifest_url: str
    packed_url: str
    delta: bool = True
    multicast: MulticastGroup | None = None
    readback: bool = False

    def to_dict(self) -> dict[str, Any]:
        return _as_dict(self)

    @classmethod
    def from_dict(cls, data: object) -> WriteImage:
        read = _Reader(cls.command, data)
        return cls(read.text("manifest_url"), read.text("packed_url"),
                   read.flag("delta", True), read.nested("multicast", MulticastGroup),
                   read.flag("readback", False))


@dataclass(frozen=True)
class DeployPartitionImage(WriteImage):
    """deploy_partition_image: the partition layout for ``boot_mode`` (auto: as the PC booted
    the ramdisk), then the image into its root partition, as write_image writes."""
    command: ClassVar[str] = "deploy_partition_image"
    boot_mode: str = "auto"

    @classmethod
    def from_dict(cls, data: object) -> DeployPartitionImage:
        image = WriteImage.from_dict(data)
        read = _Reader(cls.command, data)
        return cls(image.manifest_url, image.packed_url, image.delta, image.multicast,
                   image.readback, read.choice("boot_mode", BOOT_MODES, "auto"))


@dataclass(frozen=True)
class InstallBootloader:
    """install_bootloader: kernel, initrd and boot loader of the partition image just written."""
    command: ClassVar[str] = "install_bootloader"
    required: ClassVar[tuple[str, ...]] = ("kernel_url", "ramdisk_url")
    kernel_url: str
    ramdisk_url: str
    kernel_cmdline: str = ""

    def to_dict(self) -> dict[str, Any]:
        return _as_dict(self)

    @classmethod
    def from_dict(cls, data: object) -> InstallBootloader:
        read = _Reader(cls.command, data)
        return cls(read.text("kernel_url"), read.text("ramdisk_url"),
                   read.text_or("kernel_cmdline", ""))


@dataclass(frozen=True)
class ExportIscsi:
    """export_iscsi: the install disk as an iSCSI target (default iqn: the node's own), on
    ``portal_ip`` (default: the seat's address) and ``port``, for ``allowed_initiators``
    (addresses, networks or initiator names; None lets any in)."""
    command: ClassVar[str] = "export_iscsi"
    required: ClassVar[tuple[str, ...]] = ()
    iqn: str | None = None
    portal_ip: str | None = None
    port: int = 3260
    allowed_initiators: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = _as_dict(self)
        if self.allowed_initiators is not None:
            data["allowed_initiators"] = list(self.allowed_initiators)
        return data

    @classmethod
    def from_dict(cls, data: object) -> ExportIscsi:
        read = _Reader(cls.command, data)
        return cls(read.optional_text("iqn"), read.optional_text("portal_ip"),
                   read.number("port", 1, 65535, 3260), read.texts("allowed_initiators"))


@dataclass(frozen=True)
class UnexportIscsi:
    """unexport_iscsi: remove the export of ``iqn`` (default: the node's own)."""
    command: ClassVar[str] = "unexport_iscsi"
    required: ClassVar[tuple[str, ...]] = ()
    iqn: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return _as_dict(self)

    @classmethod
    def from_dict(cls, data: object) -> UnexportIscsi:
        return cls(_Reader(cls.command, data).optional_text("iqn"))


@dataclass(frozen=True)
class _NoParams:
    """A command that takes no params (any sent are ignored)."""
    command: ClassVar[str] = ""
    required: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_dict(cls: type[T], data: object) -> T:
        _Reader(cls.command, data)  # type: ignore[attr-defined]
        return cls()


class WipeMetadata(_NoParams):
    """wipe_metadata: erase the disk's partition tables and file system signatures."""
    command: ClassVar[str] = "wipe_metadata"


class PowerOff(_NoParams):
    command: ClassVar[str] = "power_off"


class Reboot(_NoParams):
    command: ClassVar[str] = "reboot"


@dataclass(frozen=True)
class ProveDisk:
    """prove_disk: the receipt of the last write, answering ``challenge`` (agent/proof.py,
    which checks the nonce and extents and keeps their JSON form)."""
    command: ClassVar[str] = "prove_disk"
    required: ClassVar[tuple[str, ...]] = ("nonce", "extents")
    challenge: Challenge

    def to_dict(self) -> dict[str, Any]:
        return self.challenge.params()

    @classmethod
    def from_dict(cls, data: object) -> ProveDisk:
        _Reader(cls.command, data)  # refuses what is not a JSON object
        try:
            return cls(Challenge.from_params(cast("dict[str, object]", data)))
        except ValueError as error:
            raise ParamsError(f"{cls.command}: {error}") from None


# Every command the agent knows, by name, with the class of its params.
COMMANDS: dict[str, Any] = {kind.command: kind for kind in (
    WriteImage, DeployPartitionImage, InstallBootloader, WipeMetadata, PowerOff, Reboot,
    ExportIscsi, UnexportIscsi, ProveDisk)}
