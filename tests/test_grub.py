"""GRUB configs, the Secure Boot path's rendering of the per-MAC decision (fast: pure
rendering; tests/test_firmware_boots.py boots them on QEMU seats with Secure Boot on)."""
from __future__ import annotations

import time

import pytest

from labmetal import seat_relay
from labmetal.pxe import grub
from labmetal.pxe.dnsmasq import DhcpConfig, DhcpHost, render_config
from labmetal.pxe.ipxe import (IdleScript, LocalDiskScript, OwnKernel, RamdiskScript,
                               SanbootScript, SeatMenuScript)

pytestmark = pytest.mark.fast

BASE = "http://10.99.1.1:6385"
MAC = "52:54:00:12:34:56"
KERNEL = f"{BASE}/files/images/0b4e8c1a-1f2e-4b7a-9c2d-3e4f5a6b7c8d/file"
RAMDISK = f"{BASE}/files/images/1c5f9d2b-2a3f-4c8b-8d3e-4f5a6b7c8d9e/file"


def test_every_pc_loads_its_own_config_by_the_mac_it_booted_from():
    chain = grub.chain_config().splitlines()
    assert "configfile ${cmdpath}/boot/${net_default_mac}.grub" in chain
    assert chain[-1] == "exit 1"  # labmetal unreachable: the firmware's next boot entry


def test_the_ramdisk_is_loaded_by_tftp_with_the_agents_arguments():
    config = grub.render(RamdiskScript(KERNEL, RAMDISK, BASE, "deploy", "a01"), MAC)
    (linux,) = [line.strip() for line in config.splitlines() if "linux " in line]
    assert linux.startswith("if linux ${cmdpath}/files/images/0b4e8c1a-")
    args = linux.split("/file ", 1)[1].removesuffix("; then").split()
    assert args == ["console=tty0", "console=ttyS0,115200n8", f"labmetal.api={BASE}",
                    "labmetal.mode=deploy", "BOOTIF=01-52-54-00-12-34-56"]
    assert "if initrd ${cmdpath}/files/images/1c5f9d2b-2a3f-4c8b-8d3e-4f5a6b7c8d9e/file; " \
           "then boot; fi" in config
    assert config.rstrip().endswith("reboot")


def test_local_boot_chainloads_the_disks_own_loader_with_the_disk_as_root():
    config = [line.strip() for line in grub.render(LocalDiskScript("a01"), MAC).splitlines()]
    assert 'echo "labmetal: booting the local disk of a01"' in config
    search = config.index("if search --no-floppy --file --set=root /EFI/BOOT/BOOTX64.EFI; then")
    assert config[search + 1:search + 3] == ["chainloader /EFI/BOOT/BOOTX64.EFI", "boot"]
    assert config[-1] == "exit 1"  # no such disk: a failure, so the firmware tries its next


def test_the_seat_menu_offers_the_login_ramdisk_or_runs_its_default_over_grub():
    """As iPXE's menu: L boots labmetal's login ramdisk (the password goes over HTTPS from
    there), else the default after the timeout. Without a login ramdisk, the default."""
    login = RamdiskScript(KERNEL, RAMDISK, BASE, "login", "a01",
                          kernel_args=("labmetal.tls=https://10.99.1.1:6443",))
    menu = SeatMenuScript(BASE, "boot/52-54-00-12-34-56", "a01", LocalDiskScript("a01"),
                          "Boot the local disk", timeout=7, login=login)
    lines = grub.render(menu, MAC).splitlines()
    assert "set timeout=7" in lines and "set default=1" in lines
    first = lines.index('menuentry "[L] Log in to my TP session" --hotkey=l {')
    second = lines.index('menuentry "Boot the local disk" {')
    assert any("labmetal.mode=login" in line and "labmetal.tls=https://10.99.1.1:6443" in line
               for line in lines[first:second])
    assert lines[second + 1:-1] == ["  " + line for line in
                                    grub.render(LocalDiskScript("a01"), MAC).splitlines()]
    assert lines[-1] == "}" and not any("password" in line for line in lines)
    plain = SeatMenuScript(BASE, "boot/52-54-00-12-34-56", "a01", LocalDiskScript("a01"),
                           "Boot the local disk")
    assert grub.render(plain, MAC) == grub.render(LocalDiskScript("a01"), MAC)


def test_a_diskless_session_without_its_own_kernel_says_so_and_gives_no_secret_away():
    sanboot = SanbootScript("10.99.1.1", 3260, "iqn.2026-11.org.labmetal:session.x",
                            "iqn.2026-11.org.labmetal:node", "user1", "s3cret", "ann")
    config = grub.render(sanboot, MAC)
    assert "s3cret" not in config and "user1" not in config
    assert "needs iPXE or (under Secure Boot) a template with its own kernel" in config


def test_a_diskless_session_with_its_own_kernel_boots_it_with_its_target_on_the_command_line():
    own = OwnKernel(KERNEL, RAMDISK, "02380d16-c287-442c-8238-0d16c287742c")
    sanboot = SanbootScript("10.99.1.1", 3260, "iqn.2026-11.org.labmetal:session.x",
                            "iqn.2026-11.org.labmetal:node", "user1", "s3cret", "ann",
                            own_kernel=own)
    lines = grub.render(sanboot, MAC).splitlines()
    linux = next(line.strip() for line in lines if line.strip().startswith("if linux "))
    args = linux.removesuffix("; then").split()[3:]
    assert linux.split()[2] == "${cmdpath}" + KERNEL.removeprefix(BASE)
    assert args == ["root=UUID=02380d16-c287-442c-8238-0d16c287742c", "ro", "console=tty0",
                    "console=ttyS0,115200n8", "BOOTIF=01-52-54-00-12-34-56", "ip=dhcp",
                    "iscsi_initiator=iqn.2026-11.org.labmetal:node",
                    "iscsi_target_name=iqn.2026-11.org.labmetal:session.x",
                    "iscsi_target_ip=10.99.1.1", "iscsi_target_port=3260",
                    "iscsi_username=user1", "iscsi_password=s3cret"]
    assert any("initrd ${cmdpath}/files/images/1c5f9d2b" in line for line in lines)
    with pytest.raises(ValueError):
        OwnKernel(KERNEL, RAMDISK, "x; reboot")


@pytest.mark.parametrize("message", ['"; reboot; echo "', "${prefix}", "a\nreboot", "\\$x"])
def test_shown_text_cannot_run_grub_commands(message):
    lines = grub.render(IdleScript(message), MAC).splitlines()
    shown = [line for line in lines if line.startswith('echo "labmetal: ')
             and "PC is" not in line and "no disk with" not in line]
    assert len(shown) == 1 and shown[0].count('"') == 2 and "$" not in shown[0]
    assert "reboot" not in [line.strip() for line in lines]


@pytest.mark.parametrize("kernel, args", [
    (f"{BASE}/x;reboot", ()), (f"{BASE}/x&reboot", ()), (f"{BASE}/x(y)", ()),
    (KERNEL, ("a;reboot",)), (KERNEL, ("x=(hd0)",)), (KERNEL, ("a&b",))])
def test_what_grub_would_read_as_more_than_one_word_is_refused(kernel, args):
    # iPXE accepts these (its words split on spaces only); GRUB would run a second command
    RamdiskScript(kernel, RAMDISK, BASE, kernel_args=args).render()
    with pytest.raises(ValueError, match="for GRUB"):
        grub.render(RamdiskScript(kernel, RAMDISK, BASE, kernel_args=args), MAC)


def test_uefi_pcs_get_shim_or_ipxe_each_from_one_rule():
    config = DhcpConfig("br0", "10.99.1.1", f"{BASE}/boot.ipxe", "10.99.1.0/24",
                        pool=("10.99.1.100", "10.99.1.199"))
    text = render_config(config, "/hosts", "/leases")  # type: ignore[arg-type]
    assert "dhcp-boot=tag:!ipxe,tag:efi,tag:!loader-shim,tag:!loader-ipxe,shimx64.efi" in text
    assert "dhcp-boot=tag:!ipxe,tag:efi,tag:loader-ipxe,snponly.efi" in text
    ipxe = DhcpConfig("br0", "10.99.1.1", f"{BASE}/boot.ipxe", "10.99.1.0/24",
                      pool=("10.99.1.100", "10.99.1.199"), uefi_loader="ipxe")
    assert "tag:!loader-ipxe,snponly.efi" in render_config(ipxe, "/h", "/l")  # type: ignore[arg-type]
    assert DhcpHost(MAC, loader="shim").line() == f"{MAC},set:loader-shim"
    with pytest.raises(ValueError):
        DhcpHost(MAC, loader="grub,set:known")


# --- what the conductor's TFTP makes for GRUB (a real database and image store) -----------

@pytest.fixture
def tftp_files(tmp_path):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from labmetal.conductor.tftp_files import TftpFiles
    from labmetal.db import Database
    from labmetal.images.store import ImageStore
    from labmetal.models import Image

    asked: list[str] = []
    relayed: list[str | None] = []

    class Api(BaseHTTPRequestHandler):  # labmetal's /boot/<mac>.grub, as the API renders it
        def do_GET(self) -> None:
            asked.append(self.path)
            relayed.append(self.headers.get(seat_relay.HEADER))
            found = self.path == "/boot/52-54-00-12-34-56.grub"
            self.send_response(200 if found else 404)
            self.end_headers()
            self.wfile.write(b"# the config of 52:54:00:12:34:56\n" if found else b"")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    db = Database(f"sqlite:///{tmp_path / 'tftp.db'}")
    db.upgrade()
    store = ImageStore(tmp_path / "images", 1 << 30)
    with db.write() as session:
        for name, kind in (("deploy-kernel", "kernel"), ("tp-disk", "whole-disk")):
            image = Image(name=name, kind=kind, status="active")
            session.add(image)
            session.flush()
            store.file_path(image.uuid).parent.mkdir(parents=True)
            store.file_path(image.uuid).write_bytes(f"{name} bytes".encode())
    with db.read() as session:
        uuids = {image.name: image.uuid for image in session.query(Image)}
    files = TftpFiles(f"http://127.0.0.1:{server.server_port}", db, store, relay_key=b"k" * 32)
    yield files, uuids, asked, relayed
    server.shutdown()
    server.server_close()
    db.engine.dispose()


def test_tftp_gives_grub_its_chain_its_per_mac_config_and_boot_files_only(tftp_files):
    files, uuids, asked, relayed = tftp_files
    assert files.render("grub/grub.cfg", "10.99.1.5") == grub.chain_config().encode()
    # GRUB names its MAC with colons; the API's path has hyphens
    assert files.render("boot/52:54:00:12:34:56.grub", "10.99.1.5") == \
        b"# the config of 52:54:00:12:34:56\n"
    assert asked == ["/boot/52-54-00-12-34-56.grub"]
    # on the seat's behalf: its address, signed (labmetal/seat_relay.py)
    assert seat_relay.verify(b"k" * 32, relayed[0], asked[0], time.time()) == "10.99.1.5"
    assert files.render("boot/52:54:00:aa:bb:cc.grub", "10.99.1.5") is None  # API said 404
    kernel = files.render(f"files/images/{uuids['deploy-kernel']}/file", "10.99.1.5")
    assert kernel.read_bytes() == b"deploy-kernel bytes"
    # a disk image never goes over TFTP; nor anything that is not one of these paths
    assert files.render(f"files/images/{uuids['tp-disk']}/file", "10.99.1.5") is None
    for path in ("boot/52:54:00:12:34:56.ipxe", "files/images/x/file", "grub/../../etc/passwd",
                 f"files/images/{uuids['deploy-kernel']}/raw"):
        assert files.render(path, "10.99.1.5") is None
    assert len(asked) == 2  # nothing else was relayed
