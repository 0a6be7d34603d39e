"""GRUB configs: the Secure Boot path's renderer of the same per-MAC decision iPXE renders.

A UEFI PC with Secure Boot on runs only what its firmware's keys (Microsoft's UEFI CA)
trust, so its chain is Debian's signed shim, then Debian's signed ``grubnetx64`` (which
shim loads as ``grubx64.efi`` from the same TFTP folder), then Debian's signed kernel with
labmetal's initramfs (DESIGN §4). Debian's iPXE is unsigned and cannot be in that chain.

Debian's signed network GRUB has no HTTP (``(http,...)`` is "disk not found": its image
carries no http module, and under Secure Boot it loads no module from outside), so
everything it reads comes by TFTP: ``grub/grub.cfg`` (the same for every PC, like
``/boot.ipxe``) sends it to ``boot/<its MAC>.grub``, which labmetal's TFTP renders when
it is asked, from the same decision as ``/boot/<mac>.ipxe`` (``api/boot.py``); kernels
and ramdisks follow by TFTP from ``files/images/<uuid>/file``.

Pure rendering, no I/O. GRUB's script language splits words like a shell, ends a command
at ``;``, ``|`` or ``&``, groups with ``{}`` and ``()`` and expands ``$`` in words and
double quotes, so every path and kernel argument must be one word of a small alphabet
(stricter than iPXE's, which allows ``;`` and ``&``), and shown text is reduced to
characters that mean nothing inside double quotes.
"""
from __future__ import annotations

import re
from urllib.parse import urlsplit

from labmetal.pxe.ipxe import (BootScript, IdleScript, LeaseWaitScript, LocalDiskScript,
                               LocalSessionScript,
                               RamdiskScript, SanbootScript, SeatMenuScript, kernel_arg, shown)

CHAIN_PATH = "grub/grub.cfg"  # where Debian's grubnetx64 looks first: $prefix is (tftp,…)/grub
CONFIG_SUFFIX = ".grub"
# $cmdpath is the TFTP server and folder GRUB itself came from: labmetal's TFTP root.
SERVER = "${cmdpath}"
EFI_REMOVABLE_PATH = "/EFI/BOOT/BOOTX64.EFI"
_WORD = re.compile(r"^[A-Za-z0-9._~:/@+,=%-]+$")  # nothing GRUB's parser gives a meaning


def word(value: str, what: str = "kernel argument") -> str:
    """``value`` if GRUB reads it as one plain word, else ValueError."""
    kernel_arg(value)
    if not _WORD.match(value):
        raise ValueError(f"{what} must be one word of letters, digits and ._~:/@+,=%- "
                         f"for GRUB: {value!r}")
    return value


def tftp_path(url: str) -> str:
    """The TFTP path of one of labmetal's HTTP files (``/files/images/<uuid>/file``): its
    TFTP serves the same paths for GRUB, which has no HTTP."""
    return word(urlsplit(url).path, "file path")


def _quoted(text: str) -> str:
    return f'"{shown(text)}"'


def chain_config() -> str:
    """``grub/grub.cfg``, the same for every PC: load this PC's own config, rendered when
    it asks (GRUB names the MAC it booted from ``aa:bb:cc:dd:ee:ff``). If there is none
    (labmetal unreachable), say so and return to the firmware's next boot entry."""
    return "\n".join((
        "# labmetal: every PC loads its own config, rendered when it asks.",
        "set timeout=0",
        f"configfile {SERVER}/boot/${{net_default_mac}}{CONFIG_SUFFIX}",
        'echo "labmetal: no boot config for ${net_default_mac}; booting the next device"',
        "sleep 10",
        "exit 1",
    )) + "\n"


def render(script: BootScript, mac: str) -> str:
    """The GRUB config for the decision ``script`` about the PC ``mac``."""
    lines: list[str]
    if isinstance(script, RamdiskScript):
        lines = _ramdisk(script, mac)
    elif isinstance(script, LocalDiskScript):
        who = f" of {script.node}" if shown(script.node) else ""
        lines = [f"# labmetal: boot the local disk{who}",
                 f"echo {_quoted(f'labmetal: booting the local disk{who}')}",
                 *_local_disk()]
    elif isinstance(script, IdleScript):
        lines = _idle(script)
    elif isinstance(script, SeatMenuScript) and script.login is not None:
        lines = _seat_menu(script, script.login, mac)
    elif isinstance(script, SeatMenuScript):
        lines = render(script.default, mac).splitlines()
    elif isinstance(script, LeaseWaitScript):
        lines = _idle(IdleScript(script.message, delay=10))
    elif isinstance(script, LocalSessionScript):
        lines = _local_session(script)
    elif isinstance(script, SanbootScript) and script.own_kernel is not None:
        lines = _own_kernel(script, mac)
    elif isinstance(script, SanbootScript):
        lines = _idle(IdleScript(
            f"the session of {script.student or 'this seat'} boots diskless over iSCSI, "
            "which needs iPXE or (under Secure Boot) a template with its own kernel in "
            "/boot: this one has none"))
    else:
        raise TypeError(f"no GRUB rendering for {type(script).__name__}")
    return "\n".join(lines) + "\n"


def _ramdisk(script: RamdiskScript, mac: str) -> list[str]:
    who = f" for {script.node}" if shown(script.node) else ""
    args = [*(f"console={console}" for console in script.consoles),
            f"labmetal.api={script.api_url}", f"labmetal.mode={script.mode}",
            f"BOOTIF=01-{mac.replace(':', '-')}", *script.kernel_args]
    for arg in args:
        word(arg)
    return [
        f"# labmetal: {script.mode} ramdisk{who}",
        f"echo {_quoted(f'labmetal: loading the {script.mode} ramdisk{who}')}",
        *_boot_linux(script.kernel_url, script.ramdisk_url, args, script.attempts,
                     script.retry_delay, "the ramdisk",
                     f"could not load the ramdisk after {script.attempts} attempts"),
    ]


def _boot_linux(kernel_url: str, initrd_url: str, args: list[str], attempts: int,
                retry_delay: int, what: str, given_up: str) -> list[str]:
    """Load a kernel and its initrd over TFTP and boot them. A failed load is tried again a
    few times, then the PC reboots into PXE, where it gets whatever its config says by then
    (as iPXE's RamdiskScript does)."""
    kernel, initrd = tftp_path(kernel_url), tftp_path(initrd_url)
    return [
        "for attempt in " + " ".join(str(n) for n in range(1, attempts + 1)) + "; do",
        f"  if linux {SERVER}{kernel} {' '.join(args)}; then",
        f"    if initrd {SERVER}{initrd}; then boot; fi",
        "  fi",
        f'  echo "labmetal: loading {what} failed (attempt $attempt)"',
        f"  sleep {retry_delay}",
        "done",
        f'echo "labmetal: {given_up}; rebooting"',
        "sleep 10",
        "reboot",
    ]


def _seat_menu(script: SeatMenuScript, login: RamdiskScript, mac: str) -> list[str]:
    """The seat's menu as iPXE shows it: L boots labmetal's login ramdisk (which asks for
    the password and sends it over HTTPS), else the default runs after ``timeout``."""
    indent = ["  " + line for line in _ramdisk(login, mac)]
    default = ["  " + line for line in render(script.default, mac).splitlines()]
    return [f"# labmetal: the seat menu of {shown(script.node)}",
            f"set timeout={script.timeout}",
            "set default=1",
            'menuentry "[L] Log in to my TP session" --hotkey=l {', *indent, "}",
            f"menuentry {_quoted(script.default_label)} {{", *default, "}"]


def _own_kernel(script: SanbootScript, mac: str) -> list[str]:
    """A session under Secure Boot: GRUB cannot sanboot, so it loads the template's own
    signed kernel and its own initrd, which logs in to the session's target from the
    kernel command line (the parameters of Debian's open-iscsi initramfs) and mounts the
    root filesystem by its UUID from that disk."""
    own = script.own_kernel
    assert own is not None
    who = f" of {script.student}" if shown(script.student) else ""
    args = [f"root=UUID={own.root_uuid}", "ro", *(f"console={c}" for c in
                                                  ("tty0", "ttyS0,115200n8")),
            f"BOOTIF=01-{mac.replace(':', '-')}", "ip=dhcp",
            f"iscsi_initiator={script.initiator_iqn}",
            f"iscsi_target_name={script.target_iqn}",
            f"iscsi_target_ip={script.portal_host}", f"iscsi_target_port={script.portal_port}",
            f"iscsi_username={script.chap_user}", f"iscsi_password={script.chap_secret}"]
    for arg in args:
        word(arg)
    return [
        f"# labmetal: boot the session{who}: its own kernel, its disk over iSCSI",
        f"echo {_quoted(f'labmetal: booting the session{who} over iSCSI (its own kernel)')}",
        *_boot_linux(own.kernel_url, own.initrd_url, args, script.attempts,
                     script.retry_delay, "the session's kernel", "the session did not boot"),
    ]


def _local_session(script: LocalSessionScript) -> list[str]:
    """A local session under GRUB (Secure Boot): the template's own signed kernel, with
    labmetal's session initramfs (an initramfs is not checked by shim: only the kernel)."""
    who = f" of {script.student}" if shown(script.student) else ""
    args = [*(f"console={c}" for c in script.consoles), *script.args]
    for arg in args:
        word(arg)
    return [
        f"# labmetal: boot the session{who} from this seat's disk",
        f"echo {_quoted(f'labmetal: booting the session{who} from this seat disk')}",
        *_boot_linux(script.kernel_url, script.initramfs_url, args, script.attempts,
                     script.retry_delay, "the session's kernel", "the session did not boot"),
    ]


def _local_disk() -> list[str]:
    """Chain-load the disk's EFI loader on its removable-media path, the file every
    labmetal deploy writes and a firmware boots from a disk without a boot entry (under
    Secure Boot the firmware checks it: a signed shim passes). GRUB must make the disk its
    root first, else the loaded shim is told it came from the network and finds none of
    its files. Returning to the firmware instead does not work: GRUB exits with success,
    and a UEFI boot manager shows its menu after a boot option that returned success.
    With no such disk, GRUB exits and the firmware tries its other entries."""
    return [
        f"if search --no-floppy --file --set=root {EFI_REMOVABLE_PATH}; then",
        f"  chainloader {EFI_REMOVABLE_PATH}",
        "  boot",
        "fi",
        f'echo "labmetal: no disk with {EFI_REMOVABLE_PATH}; returning to the firmware"',
        "sleep 10",
        "exit 1",
    ]


def _idle(script: IdleScript) -> list[str]:
    then = ["halt"] if script.then == "poweroff" else _local_disk()
    action = "powering off" if script.then == "poweroff" else "booting the next device"
    return ["# labmetal: nothing to do for this PC",
            f"echo {_quoted(f'labmetal: {script.message}')}",
            f'echo "labmetal: this PC is ${{net_default_mac}}; {action} in {script.delay} s"',
            f"sleep {script.delay}",
            *then]
