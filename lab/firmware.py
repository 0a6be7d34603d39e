"""What a light seat runs when it is powered on: the part of a PC's firmware and iPXE that
matters to labmetal, as a process inside the seat's network namespace.

It asks labmetal for its per-MAC iPXE script over HTTP, as iPXE would, and does what the
script says: boot the deploy ramdisk (here: run the agent with the script's kernel
arguments, the seat's disk file as its disk), boot the local disk (here: look at the disk
and report what it holds), or nothing (power off). An agent that asks for a reboot makes it
start over; one that asks for a power-off ends it. 2 cores cannot run 40 QEMU guests; this
can, and every byte still goes through the real agent, HTTP and the real disk file.
"""
from __future__ import annotations

import argparse
import hashlib
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from importlib import resources

import requests

REBOOT_FLAG = "reboot-requested"
_running: list[subprocess.Popen] = []  # the agent, while it runs
_stopping: list[bool] = []  # set by SIGTERM
_KERNEL = re.compile(r"^kernel\s+(?:--name\s+\S+\s+)?(\S+)\s*(.*)$", re.MULTILINE)


def dhcp(interface: str, state_dir: Path) -> None:
    """An address from the room's DHCP server, as a PC's PXE ROM gets one at each network
    boot (busybox's udhcpc, with the deploy ramdisk's event script): labmetal gives a seat's
    secrets only to the address leased to its MAC."""
    script = state_dir / "udhcpc.sh"
    source = resources.files("labmetal.images").joinpath("ramdisk_udhcpc.sh").read_bytes()
    script.write_bytes(source)
    script.chmod(0o700)
    for attempt in range(1, 31):
        result = subprocess.run(["busybox", "udhcpc", "-i", interface, "-f", "-q", "-n",
                                 "-t", "4", "-T", "2", "-s", str(script)],
                                capture_output=True, text=True)
        if result.returncode == 0:
            print(f"labmetal-seat: DHCP lease on {interface}", flush=True)
            return
        time.sleep(min(attempt, 5))
    raise SystemExit(f"firmware: no DHCP lease on {interface}")


def fetch_script(boot_url: str, mac: str, attempts: int = 30) -> str:
    url = f"{boot_url.rstrip('/')}/boot/{mac.replace(':', '-')}.ipxe"
    for attempt in range(attempts):
        try:
            response = requests.get(url, timeout=10)
            if response.ok:
                return response.text
        except requests.RequestException:
            pass
        time.sleep(min(1 + attempt, 5))
    raise SystemExit(f"firmware: no boot script from {url}")


def kernel_args(script: str) -> dict[str, str] | None:
    match = _KERNEL.search(script)
    if match is None:
        return None
    args = {}
    for word in match.group(2).split():
        key, _, value = word.partition("=")
        args[key] = value
    return args


def boot_disk(disk: Path) -> None:
    """The seat's "OS": what is on the disk, printed the way the test OS images print their
    marker, then idle until powered off."""
    with open(disk, "rb") as image:
        head = image.read(1024 * 1024)
    bootable = len(head) >= 512 and head[510:512] == b"\x55\xaa"
    print(f"labmetal-seat: booted from disk: mbr={'bootable' if bootable else 'none'} "
          f"first-mib-sha256={hashlib.sha256(head).hexdigest()}", flush=True)
    if not bootable:
        raise SystemExit("labmetal-seat: no bootable disk")
    signal.pause()


def run_agent(args: argparse.Namespace, kernel: dict[str, str], state_dir: Path) -> None:
    flag = state_dir / REBOOT_FLAG
    flag.unlink(missing_ok=True)
    # The agent's power commands end this seat's agent: a reboot leaves a flag behind.
    me = "$PPID"
    argv = [sys.executable, "-m", "labmetal.agent", "--api", kernel["labmetal.api"],
            "--mode", kernel.get("labmetal.mode", "deploy"), "--disk", str(args.disk),
            "--interface", args.interface,
            "--poweroff-cmd", f"sh -c 'kill -TERM {me}'",
            "--reboot-cmd", f"sh -c 'touch {shlex.quote(str(flag))}; kill -TERM {me}'"]
    print("labmetal-seat: booting the deploy ramdisk: " + " ".join(argv[3:7]), flush=True)
    agent = subprocess.Popen(argv)
    _running.append(agent)
    agent.wait()
    _running.remove(agent)
    if _stopping:
        sys.exit(0)


def _power_cut(*_: object) -> None:
    """Power off: the agent gets SIGTERM and time to stop what it started (tgtd outlives
    its parent otherwise), as an OS shutting down would; run_agent's wait returns once it
    has, and the firmware ends there. (No waiting here: this handler may interrupt that
    very wait.)"""
    _stopping.append(True)
    if not _running:
        sys.exit(0)
    for agent in _running:
        agent.terminate()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--boot-url", required=True)
    parser.add_argument("--mac", required=True)
    parser.add_argument("--disk", type=Path, required=True)
    parser.add_argument("--interface", default="eth0")
    parser.add_argument("--boot-device", choices=("network", "disk"), default="network")
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--script-attempts", type=int, default=30,
                        help="asks for the boot script before giving up (a PC then boots "
                             "its next device; here the seat goes off)")
    parser.add_argument("--post-seconds", type=float, default=0.0,
                        help="from power-on to the network boot (a PC's POST)")
    parser.add_argument("--dhcp", action="store_true",
                        help="ask for an address by DHCP at each network boot")
    args = parser.parse_args(argv)
    args.state_dir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _power_cut)
    time.sleep(args.post_seconds)
    while True:
        if args.boot_device == "disk":
            boot_disk(args.disk)
            return 0
        if args.dhcp:
            dhcp(args.interface, args.state_dir)
        script = fetch_script(args.boot_url, args.mac, args.script_attempts)
        kernel = kernel_args(script)
        if kernel is not None and "labmetal.api" in kernel:
            run_agent(args, kernel, args.state_dir)
            if (args.state_dir / REBOOT_FLAG).exists():
                print("labmetal-seat: rebooting", flush=True)
                continue
            print("labmetal-seat: powered off by the agent", flush=True)
            return 0
        if "sanboot" in script:
            boot_disk(args.disk)
            return 0
        print("labmetal-seat: nothing to do: " + " ".join(
            line[5:] for line in script.splitlines() if line.startswith("echo ")), flush=True)
        return 0


if __name__ == "__main__":
    sys.exit(main())
