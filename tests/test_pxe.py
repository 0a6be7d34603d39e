"""Network boot: DHCP by dnsmasq in a room's namespace answering real
clients (busybox udhcpc, and a PXE-ROM-like client for proxy-DHCP), and TFTP by tftpy
fetched with tftp-hpa's client, busybox's and tftpy's own."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tftpy

from labmetal.lab.network import Lab, in_namespace, remove_leftovers, run_in
from labmetal.pxe.dnsmasq import DhcpConfig, DhcpHost, Dnsmasq
from labmetal.pxe.ipxe import ChainScript, LocalDiskScript, RamdiskScript
from labmetal.pxe.tftp import TftpService, install_ipxe_binaries, requested_path
from labmetal.lab.harness import free_port, wait_for

REPO = Path(__file__).resolve().parents[1]
API = "http://10.99.1.1:6385"
BOOT_URL = "http://10.99.1.1:8080/boot.ipxe"
IPXE_USER_CLASS = "77:69505845"  # "iPXE", as iPXE sends it
# The iPXE scripts and the DHCP configuration as rendered: tests/test_boot_scripts.py (fast).


# --- DHCP: dnsmasq in a room's namespace, real clients in the seats' namespaces -------------

@pytest.fixture
def lab():
    remove_leftovers()  # what a crashed earlier run left, never a live run's namespaces
    with Lab() as made:
        yield made


@pytest.fixture
def dhcp_servers():
    started: list[Dnsmasq] = []
    yield started
    for server in started:
        server.stop()


def start_dhcp(started: list[Dnsmasq], run_dir: Path, room, hosts=(), **options) -> Dnsmasq:
    config = DhcpConfig(interface=room.bridge, server_ip=room.server_ip,
                        boot_script_url=BOOT_URL, network=str(room.network), **options)
    server = Dnsmasq(config, run_dir, namespace=room.namespace, restart_delay=0.2)
    started.append(server)
    server.start(hosts)
    wait_for(lambda: "sockets bound exclusively" in server.log_file.read_text(), 10,
             "dnsmasq to listen")
    return server


def udhcpc(seat, workdir: Path, *extra: str) -> dict[str, str]:
    """What busybox's DHCP client is told when it gets a lease (its script's variables)."""
    out = workdir / f"lease-{seat.name}-{time.monotonic_ns()}"
    script = workdir / "udhcpc.script"
    wanted = "ip|mask|siaddr|serverid|boot_file|router|hostname"
    script.write_text(f"#!/bin/sh\n[ \"$1\" = bound ] || exit 0\n"
                      f"env | grep -E '^({wanted})=' > {out}\n")
    script.chmod(0o755)
    result = run_in(seat.namespace, ["busybox", "udhcpc", "-i", seat.interface, "-f", "-q", "-n",
                                     "-t", "4", "-T", "1", "-s", str(script), *extra],
                    check=False, timeout=30)
    assert out.exists(), f"no lease:\n{result.stdout}\n{result.stderr}"
    return dict(line.split("=", 1) for line in out.read_text().splitlines())


def test_a_pxe_rom_gets_an_address_and_the_first_file_for_its_firmware(lab, dhcp_servers,
                                                                          tmp_path):
    room = lab.add_room("r1", "10.99.1.1/24")
    bios = lab.add_seat(room, "a01", "52:54:00:00:01:01")
    uefi = lab.add_seat(room, "a02", "52:54:00:00:01:02")
    odd = lab.add_seat(room, "a03", "52:54:00:00:01:03")
    start_dhcp(dhcp_servers, tmp_path / "dhcp", room, pool=("10.99.1.100", "10.99.1.199"),
               gateway="10.99.1.254", hosts=[DhcpHost(odd.mac, loader="ipxe")])

    lease = udhcpc(bios, tmp_path)
    assert lease["boot_file"] == "undionly.kpxe" and lease["siaddr"] == "10.99.1.1"
    assert lease["ip"].startswith("10.99.1.1") and lease["router"] == "10.99.1.254"
    # UEFI (client-arch 7 or 9): the signed shim, which boots with Secure Boot on or off
    for arch in ("0007", "0009"):
        lease = udhcpc(uefi, tmp_path, "-x", f"93:{arch}")
        assert lease["boot_file"] == "shimx64.efi" and lease["siaddr"] == "10.99.1.1"
    # ... unless the PC's node says otherwise (driver_info/pxe_loader): iPXE for UEFI
    assert udhcpc(odd, tmp_path, "-x", "93:0007")["boot_file"] == "snponly.efi"
    assert udhcpc(odd, tmp_path)["boot_file"] == "undionly.kpxe"  # its BIOS side unchanged


def test_ipxe_gets_the_boot_script_url_instead_of_itself(lab, dhcp_servers, tmp_path):
    room = lab.add_room("r1", "10.99.1.1/24")
    seat = lab.add_seat(room, "a01", "52:54:00:00:01:01")
    start_dhcp(dhcp_servers, tmp_path / "dhcp", room, pool=("10.99.1.100", "10.99.1.199"))
    assert udhcpc(seat, tmp_path, "-x", IPXE_USER_CLASS)["boot_file"] == BOOT_URL
    assert udhcpc(seat, tmp_path, "-x", "175:b10101")["boot_file"] == BOOT_URL  # option 175


def test_an_enrolled_pc_gets_its_fixed_address_without_restarting_dhcp(lab, dhcp_servers,
                                                                       tmp_path):
    room = lab.add_room("r1", "10.99.1.1/24")
    seat = lab.add_seat(room, "a01", "52:54:00:00:01:01")
    dhcp = start_dhcp(dhcp_servers, tmp_path / "dhcp", room, pool=("10.99.1.100", "10.99.1.199"))
    pid = dhcp.pid
    lease = udhcpc(seat, tmp_path)
    assert lease["ip"] != "10.99.1.21" and "router" not in lease  # no gateway configured
    dhcp.set_hosts([DhcpHost("52:54:00:00:01:01", "10.99.1.21", "tpr2-a01")])
    wait_for(lambda: dhcp.log_file.read_text().count("read " + str(dhcp.hosts_file)) >= 2, 10,
             "dnsmasq to re-read its hosts")
    lease = udhcpc(seat, tmp_path)
    assert lease["ip"] == "10.99.1.21" and lease["boot_file"] == "undionly.kpxe"
    assert dhcp.pid == pid and dhcp.restarts == 0


def test_dnsmasq_is_started_again_when_it_dies(lab, dhcp_servers, tmp_path):
    room = lab.add_room("r1", "10.99.1.1/24")
    seat = lab.add_seat(room, "a01", "52:54:00:00:01:01")
    dhcp = start_dhcp(dhcp_servers, tmp_path / "dhcp", room, pool=("10.99.1.100", "10.99.1.199"),
                      hosts=[DhcpHost("52:54:00:00:01:01", "10.99.1.22")])
    first = dhcp.pid
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: dhcp.pid not in (None, first), 10, "a new dnsmasq")
    assert dhcp.restarts == 1
    assert udhcpc(seat, tmp_path)["ip"] == "10.99.1.22"
    dhcp.stop()
    assert dhcp.pid is None and dhcp.restarts == 1


def test_only_enrolled_pcs_are_answered_when_asked(lab, dhcp_servers, tmp_path):
    room = lab.add_room("r1", "10.99.1.1/24")
    known = lab.add_seat(room, "a01", "52:54:00:00:01:01")
    stranger = lab.add_seat(room, "a02", "52:54:00:00:01:02")
    start_dhcp(dhcp_servers, tmp_path / "dhcp", room, pool=("10.99.1.100", "10.99.1.199"),
               enrolled_only=True, hosts=[DhcpHost("52:54:00:00:01:01")])
    assert udhcpc(known, tmp_path)["boot_file"] == "undionly.kpxe"
    assert dhcp_exchange(stranger, {"mac": stranger.mac, "options": PXE_BIOS, "wait": 1}) == []


# A PXE ROM's DISCOVER: vendor class PXEClient, client architecture, machine GUID.
PXE_BIOS = {60: b"PXEClient:Arch:00000:UNDI:002001".hex(), 93: "0000", 97: "00" + "ab" * 16}
PXE_UEFI = {60: b"PXEClient:Arch:00007:UNDI:003016".hex(), 93: "0007", 97: "00" + "cd" * 16}
BOOT_ITEM = {43: "470480000000ff"}  # PXE boot item: server type 0x8000, layer 0


def dhcp_exchange(seat, request: dict) -> list[dict]:
    """Run :func:`send_dhcp` inside the seat's namespace (it needs the seat's interface)."""
    code = ("import json, sys; from tests.test_pxe import send_dhcp; "
            "print(json.dumps(send_dhcp(**json.loads(sys.argv[1]))))")
    result = subprocess.run(in_namespace(seat.namespace, [sys.executable, "-c", code,
                                                          json.dumps(request)]),
                            capture_output=True, text=True, timeout=30, cwd=REPO)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def send_dhcp(mac: str, options: dict, message_type: int = 1, ciaddr: str = "0.0.0.0",
              server: str = "255.255.255.255", port: int = 67, wait: float = 2.0,
              expect: int = 0) -> list[dict]:
    """Send one DHCP message as a PXE ROM does (broadcast flag set, from port 68) and return
    the replies to it seen within ``wait`` seconds, or as soon as ``expect`` came: what
    udhcpc cannot show (a proxy-DHCP offer carries no address; the PXE boot-server exchange
    on port 4011)."""
    xid = int.from_bytes(os.urandom(4), "big")
    header = struct.pack("!BBBBIHH4s4s4s4s16s64s128sI", 1, 1, 6, 0, xid, 0, 0x8000,
                         socket.inet_aton(ciaddr), bytes(4), bytes(4), bytes(4),
                         bytes.fromhex(mac.replace(":", "")).ljust(16, b"\0"), b"", b"",
                         0x63825363)
    body = bytes([53, 1, message_type])
    for code, value in options.items():
        data = bytes.fromhex(value)
        body += bytes([int(code), len(data)]) + data
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")
        sock.bind(("0.0.0.0", 68))
        sock.sendto(header + body + b"\xff", (server, port))
        sock.settimeout(0.1)
        replies = []
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and not (expect and len(replies) >= expect):
            try:
                data, sender = sock.recvfrom(4096)
            except socket.timeout:
                continue
            if len(data) < 240 or data[0] != 2 or struct.unpack("!I", data[4:8])[0] != xid:
                continue
            replies.append({"from": sender[0], "yiaddr": socket.inet_ntoa(data[16:20]),
                            "siaddr": socket.inet_ntoa(data[20:24]),
                            "file": data[108:236].split(b"\0")[0].decode(),
                            "options": _dhcp_options(data[240:])})
    return replies


def _dhcp_options(data: bytes) -> dict[str, str]:
    options, i = {}, 0
    while i < len(data) and data[i] != 255:
        if data[i] == 0:
            i += 1
            continue
        options[str(data[i])] = data[i + 2:i + 2 + data[i + 1]].hex()
        i += 2 + data[i + 1]
    return options


def test_proxy_dhcp_tells_pxe_clients_what_to_boot_and_leaves_addresses_alone(
        lab, dhcp_servers, procs, tftp_root, tmp_path):
    room = lab.add_room("r1", "10.99.1.1/24")
    router = lab.add_seat(room, "gw", "52:54:00:00:00:fe", address="10.99.1.254/24")
    run_in(router.namespace, ["ip", "-6", "addr", "add", "fd99:1::fe/64", "dev", "eth0", "nodad"])
    seat = lab.add_seat(room, "a01", "52:54:00:00:01:01")
    # The room's own DHCP server and IPv6 router: it knows nothing about PXE.
    (tmp_path / "router.conf").write_text(
        "port=0\nbind-interfaces\ninterface=eth0\nno-ping\nlog-dhcp\nlog-facility=-\n"
        f"dhcp-leasefile={tmp_path / 'router.leases'}\n"
        "dhcp-range=10.99.1.50,10.99.1.59,255.255.255.0,1h\n"
        "enable-ra\ndhcp-range=::,constructor:eth0,ra-only,64\n")
    procs.start(in_namespace(router.namespace, ["/usr/sbin/dnsmasq", "--keep-in-foreground",
                                                "--user=root", "--pid-file=",
                                                f"--conf-file={tmp_path / 'router.conf'}"]),
                "router-dhcp").wait_for_output("sockets bound exclusively")
    proxy = start_dhcp(dhcp_servers, tmp_path / "dhcp", room, mode="proxy", uefi_loader="ipxe")
    assert "dhcp-option=tag:ipxe,175" not in proxy.conf_file.read_text()  # iPXE must wait

    # A plain client is left to the room's server (the proxy answers PXE clients only).
    lease = udhcpc(seat, tmp_path)
    assert lease["serverid"] == "10.99.1.254" and "boot_file" not in lease
    run_in(seat.namespace, ["ip", "addr", "add", f"{lease['ip']}/24", "dev", seat.interface])

    # BIOS: the offer carries a boot menu naming the boot server; the ROM asks it (port
    # 4011) for boot item 0x8000 and gets the file.
    offers = dhcp_exchange(seat, {"mac": seat.mac, "options": PXE_BIOS, "expect": 2})
    assert {offer["from"] for offer in offers} == {"10.99.1.1", "10.99.1.254"}
    from_proxy = [offer for offer in offers if offer["from"] == "10.99.1.1"]
    assert len(from_proxy) == 1 and from_proxy[0]["yiaddr"] == "0.0.0.0"
    assert "08078000010a630101" in from_proxy[0]["options"]["43"]  # 0x8000 at 10.99.1.1
    acks = dhcp_exchange(seat, {"mac": seat.mac, "options": {**PXE_BIOS, **BOOT_ITEM},
                                "message_type": 3, "ciaddr": lease["ip"],
                                "server": "10.99.1.1", "port": 4011, "expect": 1})
    assert [(ack["file"], ack["siaddr"]) for ack in acks] == [("undionly.kpxe", "10.99.1.1")]

    ipxe = dhcp_exchange(seat, {"mac": seat.mac, "options": {**PXE_BIOS, 77: b"iPXE".hex()},
                                "expect": 2})
    from_proxy = [offer for offer in ipxe if offer["from"] == "10.99.1.1"]
    assert [(o["file"], o["yiaddr"]) for o in from_proxy] == [(BOOT_URL, "0.0.0.0")]

    # UEFI: dnsmasq sends UEFI clients to port 4011 without a menu. A real UEFI PC
    # (OVMF's own PXE client) follows it, fetches snponly.efi over labmetal's TFTP, then iPXE
    # fetches the PC's own script over HTTP, which hands it back to its firmware.
    tap = lab.add_tap(room, "q3")
    procs.start(in_namespace(room.namespace, [
        sys.executable, "-m", "labmetal.pxe.tftp", "--root", str(tftp_root), "--listen",
        "10.99.1.1:69"]), "tftp").wait_for_output("over TFTP on 10.99.1.1:69")
    web = tmp_path / "http"
    (web / "boot").mkdir(parents=True)
    (web / "boot.ipxe").write_text(ChainScript("http://10.99.1.1:8080").render())
    (web / "boot" / "52-54-00-00-02-03.ipxe").write_text(LocalDiskScript("q3").render())
    procs.start(in_namespace(room.namespace, [sys.executable, "-m", "http.server", "-b",
                                              "10.99.1.1", "-d", str(web), "8080"]),
                "http").wait_for_output("Serving HTTP")
    serial = boot_qemu_seat(procs, room, tap, "52:54:00:00:02:03", tmp_path, "uefi", uefi=True)
    wait_for(lambda: "No more network devices" in console(serial), 120,
             "the UEFI PC to reach its own script through proxy-DHCP")
    text = console(serial)
    assert "Station IP address is 10.99.1.5" in text  # from the room's server
    assert "NBP filename is snponly.efi" in text
    assert f"NBP filesize is {(tftp_root / 'snponly.efi').stat().st_size} Bytes" in text
    assert "Filename: http://10.99.1.1:8080/boot.ipxe" in text
    assert "labmetal: booting the local disk of q3" in text
    assert "Booting from SAN device" not in text  # UEFI: back to the firmware, no sanboot
    assert not (tmp_path / "dhcp" / "dnsmasq.leases").read_text().strip()


# --- TFTP ------------------------------------------------------------------------------

@pytest.fixture
def tftp_root(tmp_path: Path) -> Path:
    root = tmp_path / "tftp"
    install_ipxe_binaries(root)
    (root / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    (tmp_path / "secret").write_text("not for PXE clients")
    (root / "escape").symlink_to(tmp_path / "secret")
    (root / "undionly.0").symlink_to("undionly.kpxe")  # a link inside the root is fine
    (root / "pxelinux.cfg").mkdir()
    return root


def pxelinux_config(path: str, client_ip: str) -> bytes | None:
    """A per-MAC file made when it is asked for, as the conductor renders them."""
    name = path.rsplit("/", 1)[-1]
    if not path.startswith("pxelinux.cfg/01-"):
        return None
    return f"DEFAULT deploy\n# for {name[3:].replace('-', ':')} at {client_ip}\n".encode()


def tftp_hpa_get(port: int, name: str, out: Path, host: str = "127.0.0.1",
                 namespace: str | None = None) -> str:
    argv = ["tftp", host, str(port), "-m", "binary", "-c", "get", name, str(out)]
    result = subprocess.run(in_namespace(namespace, argv) if namespace else argv,
                            capture_output=True, text=True, timeout=60)
    return result.stdout + result.stderr  # tftp-hpa exits 0 whatever happened


def test_tftp_clients_fetch_boot_files_and_per_mac_files_byte_exact(tftp_root, tmp_path):
    with TftpService(tftp_root, pxelinux_config, "127.0.0.1", 0) as tftp:
        undionly = (tftp_root / "undionly.kpxe").read_bytes()
        rendered = b"DEFAULT deploy\n# for 52:54:00:00:01:01 at 127.0.0.1\n"
        for name, expected in (("undionly.kpxe", undionly), ("/ipxe.efi",
                               (tftp_root / "ipxe.efi").read_bytes()),
                               ("undionly.0", undionly),
                               ("pxelinux.cfg/01-52-54-00-00-01-01", rendered)):
            out = tmp_path / "hpa.out"
            assert tftp_hpa_get(tftp.port, name, out) == ""
            assert out.read_bytes() == expected, name

        client = tftpy.TftpClient("127.0.0.1", tftp.port, options={"blksize": 1468})
        client.download("pxelinux.cfg/01-52-54-00-00-01-01", str(tmp_path / "tftpy.out"))
        assert (tmp_path / "tftpy.out").read_bytes() == rendered
        client.download("big.bin", str(tmp_path / "big.out"))
        assert sha256(tmp_path / "big.out") == sha256(tftp_root / "big.bin")

        busybox = subprocess.run(["busybox", "tftp", "-g", "-b", "8192", "-r", "snponly.efi",
                                  "-l", str(tmp_path / "bb.out"), "127.0.0.1", str(tftp.port)],
                                 capture_output=True, text=True, timeout=60)
        assert busybox.returncode == 0, busybox.stderr
        assert (tmp_path / "bb.out").read_bytes() == (tftp_root / "snponly.efi").read_bytes()
        assert tftp.restarts == 0


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tftp_refuses_uploads_and_anything_outside_its_root(tftp_root, tmp_path):
    with TftpService(tftp_root, pxelinux_config, "127.0.0.1", 0) as tftp:
        before = sorted(p.name for p in tftp_root.iterdir())
        upload = tmp_path / "upload"
        upload.write_text("a new boot file")
        result = subprocess.run(["tftp", "127.0.0.1", str(tftp.port), "-m", "binary", "-c",
                                 "put", str(upload), "evil.kpxe"],
                                capture_output=True, text=True, timeout=60)
        assert "Access violation" in result.stdout + result.stderr
        with pytest.raises(tftpy.TftpException):
            tftpy.TftpClient("127.0.0.1", tftp.port).upload("undionly.kpxe", str(upload))
        assert sorted(p.name for p in tftp_root.iterdir()) == before
        assert (tftp_root / "undionly.kpxe").read_bytes() == Path(
            "/usr/lib/ipxe/undionly.kpxe").read_bytes()

        for name in ("../secret", "pxelinux.cfg/../../secret", "escape", "/escape",
                     "pxelinux.cfg", "nothing-here", str(tmp_path / "secret")):
            out = tmp_path / "refused.out"
            message = tftp_hpa_get(tftp.port, name, out)
            assert "Error code" in message, name
            assert not out.exists() or out.read_bytes() == b"", name
        assert tftp.restarts == 0
    assert requested_path("/a//./b") == "a/b" and requested_path("a/../b") is None


def test_tftp_keeps_serving_when_a_client_vanishes_or_sends_garbage(tftp_root, tmp_path):
    with TftpService(tftp_root, pxelinux_config, "127.0.0.1", 0, retransmit_timeout=0.3,
                     retries=2) as tftp:
        # Two clients start a transfer (a file, a rendered file), get one block and vanish.
        for name in ("big.bin", "pxelinux.cfg/01-52-54-00-00-01-02"):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as vanishing:
                vanishing.sendto(b"\x00\x01" + name.encode() + b"\x00octet\x00",
                                 ("127.0.0.1", tftp.port))
                vanishing.settimeout(5)
                assert vanishing.recvfrom(1024)[0][:4] == b"\x00\x03\x00\x01"  # DATA block 1
        assert tftp.transfers == 2
        out = tmp_path / "next.out"
        assert tftp_hpa_get(tftp.port, "undionly.kpxe", out) == ""  # served meanwhile
        wait_for(lambda: tftp.transfers == 0, 10, "the vanished clients' transfers to end")
        out.unlink()
        assert tftp_hpa_get(tftp.port, "undionly.kpxe", out) == ""
        assert out.read_bytes() == (tftp_root / "undionly.kpxe").read_bytes()
        assert tftp.restarts == 0

        # A request tftpy cannot decode is refused before tftpy sees it (more in
        # tests/test_hostile_input.py).
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as garbage:
            garbage.settimeout(10)
            garbage.sendto(b"\x00\x01\xff\xfe\x00octet\x00", ("127.0.0.1", tftp.port))
            assert garbage.recvfrom(1024)[0][:4] == b"\x00\x05\x00\x01"  # ERROR: not found
        assert tftp.restarts == 0
        # A listen() that dies anyway (here: its socket closed under it) is started again.
        tftp._server.sock.close()
        wait_for(lambda: tftp.restarts == 1 and tftp.listening, 10,
                 "the TFTP server to be started again")
        out.unlink()
        assert tftp_hpa_get(tftp.port, "undionly.kpxe", out) == ""
        assert out.read_bytes() == (tftp_root / "undionly.kpxe").read_bytes()


def test_tftp_command_serves_a_room_from_inside_its_namespace(lab, procs, tftp_root, tmp_path):
    room = lab.add_room("r1", "10.99.1.1/24")
    seat = lab.add_seat(room, "a01", "52:54:00:00:01:01", address="10.99.1.11/24")
    server = procs.start(in_namespace(room.namespace, [
        sys.executable, "-m", "labmetal.pxe.tftp", "--root", str(tftp_root), "--listen",
        "10.99.1.1:69"]), "tftp")
    server.wait_for_output("over TFTP on 10.99.1.1:69")
    out = tmp_path / "seat.out"
    assert tftp_hpa_get(69, "undionly.kpxe", out, host="10.99.1.1",
                        namespace=seat.namespace) == ""
    assert out.read_bytes() == (tftp_root / "undionly.kpxe").read_bytes()
    server.stop()
    assert server.popen.returncode == 0  # stopped by SIGTERM, not killed


def test_tftp_start_reports_a_port_it_cannot_bind(tftp_root):
    port = free_port(socket.SOCK_DGRAM)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", port))
        with pytest.raises(OSError):
            TftpService(tftp_root, address="127.0.0.1", port=port).start()


# --- A whole boot: a QEMU PC (its NIC ROM is iPXE) through DHCP, boot.ipxe and its own script

MBR_PRINTING_MARKER = (  # x86 real mode: print the string after the code on COM1, halt
    bytes.fromhex("31c08ed8be167cbaf803ac84c07403eeebf8faf4ebfc") + b"LOCAL DISK BOOTED\r\n\0")


def boot_qemu_seat(procs, room, tap: str, mac: str, workdir: Path, name: str,
                   uefi: bool = False) -> Path:
    """Power on a QEMU PC on ``tap`` with a disk whose MBR prints a marker; firmware and
    iPXE text go to the returned serial log. BIOS (SeaBIOS): its NIC ROM is iPXE, network
    boot only (strict: the BIOS never boots the disk itself). UEFI (OVMF): no NIC ROM, so
    the firmware's own PXE client boots, as on a real UEFI PC."""
    disk = workdir / "disk.img"
    if not disk.exists():
        disk.write_bytes(MBR_PRINTING_MARKER.ljust(510, b"\0") + b"\x55\xaa" + bytes(1 << 20))
    sercon = workdir / "sercon-port"  # SeaBIOS copies its console to COM1 (0x3f8)
    sercon.write_bytes(struct.pack("<Q", 0x3F8))
    serial = workdir / f"{name}.serial"
    firmware = (["-bios", "/usr/share/qemu/OVMF.fd"] if uefi else
                ["-boot", "order=n,strict=on", "-fw_cfg", f"name=etc/sercon-port,file={sercon}"])
    procs.start(in_namespace(room.namespace, [
        "qemu-system-x86_64", "-accel", "tcg", "-m", "256", "-display", "none", "-vga", "none",
        "-no-reboot", *firmware, "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
        "-device", f"virtio-net-pci,netdev=n0,mac={mac}{',romfile=' if uefi else ''}",
        "-drive", f"file={disk},format=raw,if=virtio", "-serial", f"file:{serial}"]), name)
    return serial


def console(serial: Path) -> str:
    return serial.read_text(errors="replace") if serial.exists() else ""


def test_a_pc_boots_the_ramdisk_then_its_local_disk_through_dhcp_ipxe_and_its_own_script(
        lab, dhcp_servers, procs, tmp_path):
    room = lab.add_room("r1", "10.99.1.1/24", server6="fd99:1::1/64")
    tap = lab.add_tap(room, "q1")
    mac = "52:54:00:00:02:01"
    base = "http://10.99.1.1:8080"
    start_dhcp(dhcp_servers, tmp_path / "dhcp", room, pool=("10.99.1.100", "10.99.1.199"),
               router_advertisements=True, hosts=[DhcpHost(mac, "10.99.1.31", "q1")])
    web = tmp_path / "http"
    (web / "boot").mkdir(parents=True)
    (web / "boot.ipxe").write_text(ChainScript(base).render())
    own_script = web / "boot" / "52-54-00-00-02-01.ipxe"
    http = procs.start(in_namespace(room.namespace, [sys.executable, "-m", "http.server", "-b",
                                                     "10.99.1.1", "-d", str(web), "8080"]), "http")
    http.wait_for_output("Serving HTTP")

    own_script.write_text(LocalDiskScript("q1").render())
    serial = boot_qemu_seat(procs, room, tap, mac, tmp_path, "local-boot")
    wait_for(lambda: "LOCAL DISK BOOTED" in console(serial), 60, "the PC to boot its disk")
    text = console(serial)
    assert "net0: 10.99.1.31/255.255.255.0" in text and "fd99:1::" in text  # RA: no IPv6 wait
    assert "labmetal: booting the local disk of q1" in text
    assert "Booting from Hard Disk" not in text  # iPXE's sanboot booted it, not the BIOS
    procs.started[-1].stop()

    # ipxe.lkrn is a Linux-format kernel: iPXE boots it with our initrd and command line,
    # and the iPXE it starts runs that command line, whose first word is not a command.
    shutil.copyfile("/usr/lib/ipxe/ipxe.lkrn", web / "deploy.kernel")
    (web / "deploy.initramfs").write_bytes(os.urandom(64 * 1024))
    own_script.write_text(RamdiskScript(f"{base}/deploy.kernel", f"{base}/deploy.initramfs",
                                        API, node="q1").render())
    serial = boot_qemu_seat(procs, room, tap, mac, tmp_path, "ramdisk-boot")
    wait_for(lambda: "console=tty0: command not found" in console(serial), 60,
             "the ramdisk's kernel to start with labmetal's command line")
    text = console(serial)
    assert "labmetal: loading the deploy ramdisk for q1" in text
    assert text.count("iPXE initialising devices") == 2
    requests = http.output()
    assert all(f'"GET {path} HTTP/1.1" 200' in requests for path in (
        "/boot.ipxe", "/boot/52-54-00-00-02-01.ipxe", "/deploy.kernel", "/deploy.initramfs"))

