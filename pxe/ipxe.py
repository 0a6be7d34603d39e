"""iPXE scripts: the chain script every PC gets from DHCP, and what its own per-MAC script
tells it to do (boot the deploy ramdisk, boot its local disk, or stay idle).

Pure rendering, no I/O. iPXE has no quoting or escaping: a line is split on whitespace,
``${...}`` is expanded in every word, a word starting with ``#`` starts a comment and the
words ``||``, ``&&`` and ``;`` chain commands. So URLs and kernel arguments are checked and
refused if they contain anything else than their own syntax, and text that is only shown
(node names, messages) is reduced to harmless characters.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

MAGIC = "#!ipxe"
# netX is the interface iPXE booted from; hexhyp gives 52-54-00-12-34-56 (no ':' in URLs).
BOOTED_MAC = "${netX/mac:hexhyp}"
SCRIPT_PATH = "boot/{mac}.ipxe"  # under the base URL, one per MAC: see script_mac()

_URL_CHARS = re.compile(r"^[A-Za-z0-9._~:/?\[\]@!&()*+,;=%-]+$")
_KERNEL_ARG = re.compile(r"^[A-Za-z0-9._~:/?@!&()*+,;=%-]+$")
_SHOWN = re.compile(r"[^A-Za-z0-9 ._:/@()+,=~'-]")
_IQN = re.compile(r"^iqn\.\d{4}-\d{2}\.[a-z0-9.-]+(?::[A-Za-z0-9.:_-]+)?$")
_CHAP = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_IPV4 = re.compile(r"^\d{1,3}(?:\.\d{1,3}){3}$")
_SCRIPT_NAME = re.compile(r"^([0-9a-f]{2}(?:-[0-9a-f]{2}){5})\.ipxe$")

RamdiskMode = Literal["deploy", "inspect", "clean", "discovery", "login", "session"]


def url(value: str, what: str = "URL") -> str:
    """``value`` if it is an http(s) URL iPXE reads as one word with nothing to expand."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or not _URL_CHARS.match(value):
        raise ValueError(f"{what} must be an http(s) URL without spaces, quotes, '$', "
                         f"'{{' or '}}': {value!r}")
    return value


def kernel_arg(value: str) -> str:
    if not _KERNEL_ARG.match(value) or value in ("||", "&&", ";"):
        raise ValueError(f"kernel argument must be one word without quotes, '$', '#', '{{' "
                         f"or '}}': {value!r}")
    return value


def shown(text: str) -> str:
    """``text`` reduced to characters iPXE's ``echo`` prints as they are; anything else
    (``$``, braces, ``#``, control characters) becomes ``?``."""
    words = [word if word not in ("||", "&&", ";") else "?" for word in
             _SHOWN.sub("?", text).split()]
    return " ".join(words)


def script_mac(name: str) -> str | None:
    """The MAC (``52:54:00:12:34:56``) of a per-MAC script's file name
    (``52-54-00-12-34-56.ipxe``), or None if ``name`` is not one."""
    match = _SCRIPT_NAME.match(name.lower())
    return match.group(1).replace("-", ":") if match else None


def _lines(*lines: str) -> str:
    return "\n".join((MAGIC, *lines)) + "\n"


@dataclass(frozen=True)
class ChainScript:
    """``/boot.ipxe``, the same for every PC: fetch this PC's own script from
    ``<base_url>/boot/<mac>.ipxe``, retrying a few times; if the server stays unreachable,
    say so and hand the PC back to its firmware (``exit``: the next boot device, usually
    the local disk), so a room stays usable while labmetal is down."""
    base_url: str
    attempts: int = 3
    retry_delay: int = 5

    def __post_init__(self) -> None:
        url(self.base_url, "base URL")
        if self.attempts < 1 or self.retry_delay < 0:
            raise ValueError("attempts must be >= 1 and retry_delay >= 0")

    def render(self) -> str:
        base = self.base_url.rstrip("/")
        target = f"{base}/{SCRIPT_PATH.format(mac=BOOTED_MAC)}"
        return _lines(
            "# labmetal: every PC fetches its own script, rendered when it asks.",
            "set attempt:int32 0",
            ":fetch",
            f"chain --replace --autofree {target} || goto retry",
            ":retry",
            "inc attempt",
            f"iseq ${{attempt}} {self.attempts} && goto unreachable ||",
            f"echo labmetal: no boot script from {base} for ${{netX/mac}},"
            f" retrying in {self.retry_delay} s",
            f"sleep {self.retry_delay}",
            "goto fetch",
            ":unreachable",
            f"echo labmetal: {base} did not answer for ${{netX/mac}} after {self.attempts}"
            " attempts; booting the next device",
            "sleep 10",
            "exit 1",
        )


@dataclass(frozen=True)
class RamdiskScript:
    """Boot the labmetal ramdisk (kernel + initramfs over HTTP) in ``mode``: the agent
    finds labmetal's API in ``labmetal.api=``, its mode in ``labmetal.mode=`` and the
    interface the PC booted from in ``BOOTIF=`` (pxelinux's convention). ``discovery`` is
    for a PC labmetal does not know: its agent enlists the PC with its inventory.
    A failed download is retried; after ``attempts`` the PC reboots into PXE, where it gets
    whatever its script says by then (the conductor's callback timeout handles a PC that
    never calls back)."""
    kernel_url: str
    ramdisk_url: str
    api_url: str
    mode: RamdiskMode = "deploy"
    node: str = ""  # shown on the PC's screen only
    consoles: tuple[str, ...] = ("tty0", "ttyS0,115200n8")  # the last one is /dev/console
    kernel_args: tuple[str, ...] = ()
    attempts: int = 3
    retry_delay: int = 5

    def __post_init__(self) -> None:
        url(self.kernel_url, "kernel URL")
        url(self.ramdisk_url, "ramdisk URL")
        url(self.api_url, "API URL")
        if self.mode not in ("deploy", "inspect", "clean", "discovery", "login", "session"):
            raise ValueError(f"unknown ramdisk mode {self.mode!r}")
        for arg in (*self.kernel_args, *(f"console={c}" for c in self.consoles)):
            kernel_arg(arg)
        if self.attempts < 1 or self.retry_delay < 0:
            raise ValueError("attempts must be >= 1 and retry_delay >= 0")

    @property
    def cmdline(self) -> str:
        # initrd=ramdisk lets a UEFI kernel's EFI stub find the initramfs by its iPXE name.
        return " ".join(("initrd=ramdisk", *(f"console={c}" for c in self.consoles),
                         f"labmetal.api={self.api_url}", f"labmetal.mode={self.mode}",
                         f"BOOTIF=01-{BOOTED_MAC}", *self.kernel_args))

    def render(self) -> str:
        who = f" for {shown(self.node)}" if shown(self.node) else ""
        return _lines(f"# labmetal: {self.mode} ramdisk{who}",
                      *_load_and_boot(f"loading the {self.mode} ramdisk{who}", "the ramdisk",
                                      f"{self.kernel_url} {self.cmdline}",
                                      f"--name ramdisk {self.ramdisk_url}", self.attempts,
                                      self.retry_delay))


def _load_and_boot(doing: str, what: str, kernel: str, initrd: str, attempts: int,
                   retry_delay: int) -> list[str]:
    """Load a kernel and its initrd over HTTP and boot them; a failed load is tried again
    ``attempts`` times, then the PC reboots into PXE (its script decides again)."""
    return [
        "set attempt:int32 0",
        ":fetch",
        f"echo labmetal: {doing}",
        "imgfree",
        f"kernel --name kernel {kernel} || goto retry",
        f"initrd {initrd} || goto retry",
        "boot || goto retry",
        ":retry",
        "inc attempt",
        f"iseq ${{attempt}} {attempts} && goto failed ||",
        f"echo labmetal: loading {what} failed, retrying in {retry_delay} s",
        f"sleep {retry_delay}",
        "goto fetch",
        ":failed",
        f"echo labmetal: could not load {what} after {attempts} attempts; rebooting",
        "sleep 10",
        "reboot || exit 1",
    ]


@dataclass(frozen=True)
class LocalDiskScript:
    """Boot the PC's own disk. On BIOS, ``sanboot --no-describe --drive 0x80`` boots the
    first disk's MBR directly: it works whatever the firmware's boot order is (lab PCs are
    often set to network only) and avoids ``exit``, after which some PXE ROMs hang instead
    of trying the next device. UEFI has no drive 0x80 to hand to iPXE; there ``exit 1``
    returns to the firmware's boot manager with a failure, on which it boots its next entry
    (the disk): after a success it would show its menu instead."""
    node: str = ""

    def render(self) -> str:
        who = f" of {shown(self.node)}" if shown(self.node) else ""
        return _lines(
            f"# labmetal: boot the local disk{who}",
            f"echo labmetal: booting the local disk{who}",
            "iseq ${platform} efi && goto firmware ||",
            "sanboot --no-describe --drive 0x80 ||",
            "echo labmetal: the first disk did not boot; returning to the firmware",
            ":firmware",
            "exit 1",
        )


@dataclass(frozen=True)
class IdleScript:
    """Nothing to do for this PC (not enrolled, or no action pending): show why, wait
    ``delay`` seconds so a person at the PC can read it, then power off or return to the
    firmware. Debian's iPXE is built without ``poweroff``: ``exit`` is its fallback. The
    exit is a failure (1), on which a UEFI boot manager tries its next entry (after a
    success it shows its menu); a BIOS tries its next device either way."""
    message: str
    then: Literal["poweroff", "exit"] = "exit"
    delay: int = 30

    def __post_init__(self) -> None:
        if self.then not in ("poweroff", "exit"):
            raise ValueError("then must be 'poweroff' or 'exit'")
        if self.delay < 0:
            raise ValueError("delay must be >= 0")

    def render(self) -> str:
        if self.then == "poweroff":
            action, final = "powering off", "poweroff || exit 1"
        else:
            action, final = "booting the next device", "exit 1"
        return _lines(
            "# labmetal: nothing to do for this PC",
            f"echo labmetal: {shown(self.message)}",
            f"echo labmetal: this PC is ${{netX/mac}}; {action} in {self.delay} s",
            f"sleep {self.delay}",
            final,
        )


@dataclass(frozen=True)
class LeaseWaitScript:
    """The seat asked before labmetal copied its DHCP lease (labmetal/leases.py polls
    dnsmasq's file every half second, and iPXE asks for its script right after its DHCP
    answer): wait ``delay`` seconds and ask again, up to ``attempts`` times (a counter kept
    in iPXE's settings across ``chain --replace``), then give up as an idle PC does. A PC
    that holds no lease at all gets nothing more than this by asking."""
    base_url: str
    message: str
    attempts: int = 5
    delay: int = 2

    def __post_init__(self) -> None:
        url(self.base_url, "base URL")
        if self.attempts < 1 or self.delay < 0:
            raise ValueError("attempts must be >= 1 and delay >= 0")

    def render(self) -> str:
        target = f"{self.base_url.rstrip('/')}/{SCRIPT_PATH.format(mac=BOOTED_MAC)}"
        return _lines(
            "# labmetal: this seat's lease is not known yet",
            "isset ${labmetal_lease_wait} || set labmetal_lease_wait:int32 0",
            "inc labmetal_lease_wait",
            f"iseq ${{labmetal_lease_wait}} {self.attempts + 1} && goto give_up ||",
            f"echo labmetal: {shown(self.message)}; asking again in {self.delay} s",
            f"sleep {self.delay}",
            f"chain --replace --autofree {target} ||",
            ":give_up",
            "set labmetal_lease_wait:int32 0",
            f"echo labmetal: {shown(self.message)}; booting the next device in 30 s",
            "sleep 30",
            "exit 1",
        )


@dataclass(frozen=True)
class OwnKernel:
    """A template's own kernel and initrd (labmetal's HTTP URLs) and its root filesystem's
    UUID: how a seat without iPXE (Secure Boot: GRUB) boots a session (pxe/grub.py)."""
    kernel_url: str
    initrd_url: str
    root_uuid: str

    def __post_init__(self) -> None:
        url(self.kernel_url, "kernel URL")
        url(self.initrd_url, "initrd URL")
        if not re.fullmatch(r"[0-9A-Fa-f-]{8,36}", self.root_uuid):
            raise ValueError(f"not a filesystem UUID: {self.root_uuid!r}")


@dataclass(frozen=True)
class SanbootScript:
    """Boot a student's session disk from its iSCSI target (LUN 1; LUN 0 is tgt's
    controller) as the seat's BIOS disk. iPXE describes the connection in an iBFT (target,
    CHAP account, initiator name, the NIC's address), from which the OS's initramfs logs in
    again once iPXE's connection is gone. The target lets in only this seat's initiator
    name with this session's CHAP account. If the target does not answer, the seat retries,
    then falls back to its firmware."""
    portal_host: str  # IPv4 address the seats reach the target server at
    portal_port: int
    target_iqn: str
    initiator_iqn: str
    chap_user: str
    chap_secret: str
    student: str = ""  # shown on the PC's screen only
    attempts: int = 3
    retry_delay: int = 5
    own_kernel: OwnKernel | None = None  # for GRUB (Secure Boot seats); iPXE sanboots

    def __post_init__(self) -> None:
        if not _IPV4.match(self.portal_host) or not 0 < self.portal_port < 65536:
            raise ValueError(f"iSCSI portal must be IPv4:port: "
                             f"{self.portal_host}:{self.portal_port}")
        for what, value in (("target", self.target_iqn), ("initiator", self.initiator_iqn)):
            if not _IQN.match(value):
                raise ValueError(f"{what} name must be an iqn. name: {value!r}")
        for what, value in (("CHAP user", self.chap_user), ("CHAP secret", self.chap_secret)):
            if not _CHAP.match(value):
                raise ValueError(f"{what} must be 1-64 letters, digits, '.', '_' or '-'")

    @property
    def root_path(self) -> str:
        return f"iscsi:{self.portal_host}::{self.portal_port}:1:{self.target_iqn}"

    def render(self) -> str:
        who = f" of {shown(self.student)}" if shown(self.student) else ""
        return _lines(
            f"# labmetal: boot the session{who} from its iSCSI disk",
            f"set initiator-iqn {self.initiator_iqn}",
            f"set username {self.chap_user}",
            f"set password {self.chap_secret}",
            "set attempt:int32 0",
            ":boot",
            f"echo labmetal: booting the session{who} over iSCSI",
            f"sanboot {self.root_path} || goto retry",
            ":retry",
            "inc attempt",
            f"iseq ${{attempt}} {self.attempts} && goto failed ||",
            f"echo labmetal: the session disk did not answer, retrying in {self.retry_delay} s",
            f"sleep {self.retry_delay}",
            "goto boot",
            ":failed",
            f"echo labmetal: the session disk did not boot after {self.attempts} attempts;"
            " returning to the firmware",
            "sleep 10",
            "exit 1",
        )


@dataclass(frozen=True)
class LocalSessionScript:
    """Boot a student's local session (issue 16): the template's own kernel with labmetal's
    session initramfs, which assembles the root from the seat's cache (the template copy
    and the student's overlay, device-mapper) and switches to it: the OS needs nothing from
    the network for its disk. ``args`` name the cache (agent/seat_cache.kernel_args); they
    hold no secret. A failed download is retried, then the seat reboots into PXE."""
    kernel_url: str
    initramfs_url: str
    args: tuple[str, ...]
    student: str = ""  # shown on the PC's screen only
    consoles: tuple[str, ...] = ("tty0", "ttyS0,115200n8")
    attempts: int = 3
    retry_delay: int = 5

    def __post_init__(self) -> None:
        url(self.kernel_url, "kernel URL")
        url(self.initramfs_url, "initramfs URL")
        for arg in (*self.args, *(f"console={c}" for c in self.consoles)):
            kernel_arg(arg)

    @property
    def cmdline(self) -> str:
        return " ".join(("initrd=session", *(f"console={c}" for c in self.consoles),
                         *self.args))

    def render(self) -> str:
        who = f" of {shown(self.student)}" if shown(self.student) else ""
        return _lines(f"# labmetal: boot the session{who} from this seat's disk",
                      *_load_and_boot(f"booting the session{who} from this seat's disk",
                                      "the session", f"{self.kernel_url} {self.cmdline}",
                                      f"--name session {self.initramfs_url}", self.attempts,
                                      self.retry_delay))


def _body(script: BootScript) -> list[str]:
    """A script's lines after its ``#!ipxe``, to inline it under a label."""
    return script.render().splitlines()[1:]


@dataclass(frozen=True)
class SeatMenuScript:
    """A PC with nothing else to do shows a menu for ``timeout`` seconds: a student logs in
    to boot their TP session, or ``default`` runs (the PC's own disk, or back to the
    firmware). The login is labmetal's ramdisk in ``login`` mode (``<mac_path>/login.ipxe``):
    it asks for the password and sends it over HTTPS, which iPXE cannot (DESIGN §11)."""
    base_url: str
    mac_path: str  # this PC's scripts' folder under base_url: "boot/52-54-00-12-34-56"
    node: str
    default: LocalDiskScript | IdleScript
    default_label: str
    timeout: int = 5
    login: RamdiskScript | None = None  # the login ramdisk, for GRUB's menu (pxe/grub.py)

    def __post_init__(self) -> None:
        url(self.base_url, "base URL")
        if script_mac(self.mac_path.rsplit("/", 1)[-1] + ".ipxe") is None:
            raise ValueError(f"not a per-MAC path: {self.mac_path!r}")
        if self.timeout < 1:
            raise ValueError("timeout must be >= 1")

    def render(self) -> str:
        base = self.base_url.rstrip("/")
        return _lines(
            f"# labmetal: the seat menu of {shown(self.node)}",
            f"menu labmetal - {shown(self.node)}",
            "item --key l session [L] Log in to my TP session",
            f"item default {shown(self.default_label)}",
            f"choose --timeout {self.timeout * 1000} --default default choice"
            " || goto default",
            "goto ${choice}",
            ":session",
            f"chain --replace --autofree {base}/{self.mac_path}/login.ipxe || goto failed",
            ":failed",
            "echo labmetal: the login could not be loaded",
            "sleep 3",
            ":default",
            *_body(self.default),
        )


BootScript = (ChainScript | RamdiskScript | LocalDiskScript | IdleScript | SanbootScript
              | LeaseWaitScript | SeatMenuScript | LocalSessionScript)
