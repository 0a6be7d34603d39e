"""GRUB configs, the Secure Boot path's rendering of the per-MAC decision (fast: pure
rendering; tests/test_firmware_boots.py boots them on QEMU seats with Secure Boot on)."""
from __future__ import annotations

import pytest

from labmetal.pxe import grub
from labmetal.pxe.dnsmasq import DhcpConfig, DhcpHost, render_config
from labmetal.pxe.ipxe import (IdleScript, LocalDiskScript, RamdiskScript, SanbootScript,
                               SeatMenuScript)

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


def test_local_boot_returns_to_the_firmware_which_boots_the_disk():
    config = grub.render(LocalDiskScript("a01"), MAC).splitlines()
    assert config[-1] == "exit 0"
    assert 'echo "labmetal: booting the local disk of a01"' in config


def test_the_seat_menu_runs_its_default_no_password_over_grub():
    menu = SeatMenuScript(BASE, "boot/52-54-00-12-34-56", "a01", LocalDiskScript("a01"),
                          "Boot the local disk")
    assert grub.render(menu, MAC) == grub.render(LocalDiskScript("a01"), MAC)


def test_a_diskless_session_says_it_needs_ipxe_and_gives_no_secret_away():
    sanboot = SanbootScript("10.99.1.1", 3260, "iqn.2026-11.org.labmetal:session.x",
                            "iqn.2026-11.org.labmetal:node", "user1", "s3cret", "ann")
    config = grub.render(sanboot, MAC)
    assert "s3cret" not in config and "user1" not in config
    assert "needs iPXE: not under Secure Boot" in config


@pytest.mark.parametrize("message", ['"; reboot; echo "', "${prefix}", "a\nreboot", "\\$x"])
def test_shown_text_cannot_run_grub_commands(message):
    lines = grub.render(IdleScript(message), MAC).splitlines()
    shown = [line for line in lines if line.startswith('echo "labmetal: ') and "PC is" not in line]
    assert len(shown) == 1 and shown[0].count('"') == 2 and "$" not in shown[0]
    assert "reboot" not in [line.strip() for line in lines]


def test_a_url_outside_labmetals_files_is_refused():
    with pytest.raises(ValueError):
        grub.render(RamdiskScript(f"{BASE}/x;reboot", RAMDISK, BASE), MAC)


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
