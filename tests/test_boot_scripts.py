"""The iPXE scripts and the DHCP configuration, as rendered (fast: pure text; tests/test_pxe.py
serves them to real clients in network namespaces, tests/test_lab_boots.py boots them)."""
from __future__ import annotations

from pathlib import Path

import pytest

from labmetal.pxe.dnsmasq import DhcpConfig, DhcpHost, render_config, render_hosts
from labmetal.pxe.ipxe import (ChainScript, IdleScript, LeaseWaitScript, LocalDiskScript,
                               RamdiskScript, SanbootScript, SeatMenuScript, script_mac)

pytestmark = pytest.mark.fast

API = "http://10.99.1.1:6385"
BOOT_URL = "http://10.99.1.1:8080/boot.ipxe"


def test_every_pc_chains_its_own_script_and_is_told_clearly_when_the_server_is_down():
    script = ChainScript("http://10.99.1.1:8080/", attempts=4, retry_delay=2).render()
    assert script.startswith("#!ipxe\n")
    assert ("chain --replace --autofree http://10.99.1.1:8080/boot/${netX/mac:hexhyp}.ipxe"
            " || goto retry") in script
    assert "iseq ${attempt} 4 && goto unreachable ||" in script
    assert "sleep 2" in script
    unreachable = script.split(":unreachable\n")[1]
    assert "http://10.99.1.1:8080 did not answer" in unreachable
    assert unreachable.rstrip().endswith("exit 1")  # the firmware boots the next device
    assert script_mac("52-54-00-12-34-56.ipxe") == "52:54:00:12:34:56"
    assert script_mac("52-54-00-12-34-56.ipxe.bak") is None
    assert script_mac("../52-54-00-12-34-56.ipxe") is None


def test_the_ramdisk_script_tells_the_agent_where_the_api_is():
    script = RamdiskScript("http://10.99.1.1:8080/deploy.kernel",
                           "http://10.99.1.1:8080/deploy.initramfs", API, mode="deploy",
                           node="tpr2-a01", kernel_args=("ipa-debug=1",)).render()
    kernel = next(line for line in script.splitlines() if line.startswith("kernel "))
    assert kernel == ("kernel --name kernel http://10.99.1.1:8080/deploy.kernel initrd=ramdisk"
                      " console=tty0 console=ttyS0,115200n8 labmetal.api=http://10.99.1.1:6385"
                      " labmetal.mode=deploy BOOTIF=01-${netX/mac:hexhyp} ipa-debug=1"
                      " || goto retry")
    assert "initrd --name ramdisk http://10.99.1.1:8080/deploy.initramfs || goto retry" in script
    assert "boot || goto retry" in script
    assert "echo labmetal: loading the deploy ramdisk for tpr2-a01" in script
    assert script.rstrip().endswith("reboot || exit 1")

    discovery = RamdiskScript("http://10.99.1.1:8080/k", "http://10.99.1.1:8080/r", API,
                              mode="discovery").render()
    assert "labmetal.mode=discovery" in discovery


def test_local_boot_uses_the_first_disk_on_bios_and_the_firmware_on_uefi():
    script = LocalDiskScript("tpr2-a01").render()
    lines = script.splitlines()
    assert lines.index("iseq ${platform} efi && goto firmware ||") < lines.index(
        "sanboot --no-describe --drive 0x80 ||") < lines.index(":firmware")
    assert lines[-1] == "exit 1"  # UEFI: a failure, so the boot manager boots its next entry


def test_a_pc_with_nothing_to_do_says_why_and_powers_off_or_moves_on():
    poweroff = IdleScript("this PC is not enrolled in labmetal", then="poweroff", delay=20)
    text = poweroff.render()
    assert "echo labmetal: this PC is not enrolled in labmetal" in text
    assert "sleep 20" in text
    assert text.splitlines()[-1] == "poweroff || exit 1"  # Debian's iPXE has no poweroff
    assert IdleScript("no action pending").render().splitlines()[-1] == "exit 1"


def test_a_seat_that_asks_before_its_lease_is_known_asks_again_a_few_times():
    """iPXE asks for its script right after its DHCP answer, before labmetal may have
    copied the lease: it is told to wait and ask again (its own URL), 3 times, then it
    gives up as an idle PC does; the counter lives in iPXE's settings across chains."""
    text = LeaseWaitScript("http://10.99.1.1:6385", "not seat a01's ${x}", attempts=3,
                           delay=2).render()
    lines = text.splitlines()
    assert "isset ${labmetal_lease_wait} || set labmetal_lease_wait:int32 0" in lines
    assert "iseq ${labmetal_lease_wait} 4 && goto give_up ||" in lines
    assert ("chain --replace --autofree http://10.99.1.1:6385/boot/${netX/mac:hexhyp}.ipxe ||"
            in lines)
    assert lines.index("sleep 2") < lines.index(":give_up") < lines.index("exit 1")
    assert "${x}" not in text and "not seat a01's ??x?" in text
    with pytest.raises(ValueError):
        LeaseWaitScript("http://10.99.1.1/${x}", "m")


@pytest.mark.parametrize("bad_url", [
    "http://10.99.1.1/k ${evil}", "http://10.99.1.1/k\nshell", "http://10.99.1.1/${x}",
    "ftp://10.99.1.1/k", "http:///k", "http://10.99.1.1/k'", 'http://10.99.1.1/"k',
])
def test_urls_that_would_change_the_script_are_refused(bad_url):
    with pytest.raises(ValueError):
        RamdiskScript(bad_url, "http://10.99.1.1/r", API)
    with pytest.raises(ValueError):
        ChainScript(bad_url)


def test_user_text_cannot_run_ipxe_commands():
    for arg in ("a b", "x=${root}", "#", "||", "q=\"x\"", "a\nshell"):
        with pytest.raises(ValueError):
            RamdiskScript("http://10.99.1.1/k", "http://10.99.1.1/r", API, kernel_args=(arg,))
    with pytest.raises(ValueError):
        RamdiskScript("http://10.99.1.1/k", "http://10.99.1.1/r", API,
                      mode="shell")  # type: ignore[arg-type]
    script = IdleScript("pc ${net0/ip} || shell ; chain http://x #\nshell").render()
    message = script.splitlines()[2]
    assert message == "echo labmetal: pc ??net0/ip? ?? shell ? chain http://x ??shell"
    node = RamdiskScript("http://10.99.1.1/k", "http://10.99.1.1/r", API,
                         node="a01 && shell").render()
    assert "echo labmetal: loading the deploy ramdisk for a01 ?? shell\n" in node


SESSION_IQN = "iqn.2026-11.org.labmetal:session.5d2f0c1e-0000-4000-8000-000000000001"


SEAT_IQN = "iqn.2026-11.org.labmetal:7c9e6679-7425-40de-944b-e07fc1f90ae7"


def test_a_session_seat_sanboots_lun_1_with_its_chap_account_and_initiator_name():
    script = SanbootScript("10.99.1.2", 3260, SESSION_IQN, SEAT_IQN, "lm0123", "S3cretS3cret",
                           student="ann").render()
    lines = script.splitlines()
    assert lines[0] == "#!ipxe"
    assert f"set initiator-iqn {SEAT_IQN}" in lines
    assert "set username lm0123" in lines and "set password S3cretS3cret" in lines
    assert f"sanboot iscsi:10.99.1.2::3260:1:{SESSION_IQN} || goto retry" in lines
    assert lines[-1] == "exit 1"  # a target that never answers: back to the firmware


@pytest.mark.parametrize("field, bad", [
    ("portal_host", "10.99.1.2 || shell"), ("portal_host", "server.example"),
    ("target_iqn", "iqn.2026-11.org.labmetal:x ${net0/ip}"), ("initiator_iqn", "ann"),
    ("chap_user", "a b"), ("chap_secret", "x;shell"), ("chap_secret", "${password}"),
])
def test_sanboot_values_that_would_change_the_script_are_refused(field, bad):
    values = {"portal_host": "10.99.1.2", "portal_port": 3260, "target_iqn": SESSION_IQN,
              "initiator_iqn": SEAT_IQN, "chap_user": "lm0123", "chap_secret": "S3cret",
              field: bad}
    with pytest.raises(ValueError):
        SanbootScript(**values)


def test_the_seat_menu_offers_a_login_in_labmetals_ramdisk_and_asks_no_password():
    """iPXE has no TLS: the menu's login boots labmetal's ramdisk (the seat's login.ipxe),
    which asks for the password; nothing in the menu reads or sends one."""
    base, folder = "http://10.99.1.2:6385", "boot/52-54-00-12-34-56"
    menu = SeatMenuScript(base, folder, "pc1 && shell", LocalDiskScript("pc1"),
                          "Boot the local disk", timeout=7).render().splitlines()
    assert "menu labmetal - pc1 ?? shell" in menu
    assert "choose --timeout 7000 --default default choice || goto default" in menu
    assert (f"chain --replace --autofree http://10.99.1.2:6385/{folder}/login.ipxe"
            " || goto failed") in menu
    assert not any(line.startswith("login") or "password" in line for line in menu)
    assert menu[-1] == "exit 1"  # the default: the local disk's own lines, inlined
    login = RamdiskScript("http://10.99.1.2/k", "http://10.99.1.2/r", base, mode="login",
                          kernel_args=("labmetal.tls=https://10.99.1.2:6443",
                                       "labmetal.ca=" + "ab" * 32)).render()
    assert "labmetal.mode=login" in login and "labmetal.tls=https://10.99.1.2:6443" in login


def test_dhcp_config_refuses_what_would_break_the_file():
    with pytest.raises(ValueError):
        DhcpHost("52:54:00:00:01:01\ndhcp-script=/bin/sh")
    with pytest.raises(ValueError):
        DhcpHost("52:54:00:00:01:01", hostname="a,b")
    with pytest.raises(ValueError):
        render_hosts([DhcpHost("52:54:00:00:01:01", "10.99.1.21"),
                      DhcpHost("52:54:00:00:01:01", "10.99.1.22")])
    hosts = [DhcpHost("52:54:00:00:01:02"), DhcpHost("52:54:00:00:01:01", "10.99.1.21", "tpr2-a01")]
    assert render_hosts(hosts) == (
        "52:54:00:00:01:01,10.99.1.21,tpr2-a01\n52:54:00:00:01:02\n")
    with pytest.raises(ValueError):
        DhcpConfig("lmt-br", "10.99.1.1", BOOT_URL, "10.99.1.0/24", pool=("10.99.1.2",
                                                                          "10.99.2.9"))
    with pytest.raises(ValueError):
        DhcpConfig("lmt-br\nx", "10.99.1.1", BOOT_URL, "10.99.1.0/24", mode="proxy")
    with pytest.raises(ValueError):
        DhcpConfig("lmt-br", "10.99.1.1", "http://x/ ${a}", "10.99.1.0/24", mode="proxy")
    with pytest.raises(ValueError):
        DhcpConfig("lmt-br", "10.99.1.1", BOOT_URL, "10.99.1.0/24", mode="proxy",
                   router_advertisements=True)
    text = render_config(DhcpConfig("lmt-br", "10.99.1.1", BOOT_URL, "10.99.1.0/24",
                                    pool=("10.99.1.100", "10.99.1.199")),
                         Path("/run/x/hosts"), Path("/run/x/leases"))
    assert "port=0\n" in text and "no-ping\n" in text and "enable-ra" not in text

