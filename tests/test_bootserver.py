"""The conductor's own DHCP and TFTP, configured from `labmetal serve`, answering a seat in
the simulated room; enrolling a port reaches dnsmasq's host list without a restart."""
from __future__ import annotations

from pathlib import Path

import requests

from labmetal.lab.network import Lab, run_in
from labmetal.lab.harness import start_service, wait_for
from tests.test_pxe import udhcpc


def test_labmetal_serves_dhcp_and_tftp_to_a_room(procs, tmp_path):
    with Lab() as lab:
        room = lab.add_room("r30", server="10.99.30.1/24")
        lab.add_uplink(room, "10.99.30.2/24")
        seat = lab.add_seat(room, "s1", "52:54:00:30:00:01")
        service = start_service(
            procs, "boot", host="10.99.30.2", tftp_listen="10.99.30.2:69",
            dhcp_interface=room.bridge, dhcp_namespace=room.namespace,
            dhcp_network="10.99.30.0/24", dhcp_pool="10.99.30.100,10.99.30.150",
            self_registration="true")
        lease = udhcpc(seat, tmp_path)
        assert lease["boot_file"] == "undionly.kpxe" and lease["siaddr"] == "10.99.30.2"
        ipxe = udhcpc(seat, tmp_path, "-x", "175:b10101")
        assert ipxe["boot_file"] == f"{service.url}/boot.ipxe"

        run_in(seat.namespace, ["ip", "addr", "add", f"{lease['ip']}/24", "dev", "eth0"])
        fetched = tmp_path / "undionly.kpxe"
        run_in(seat.namespace, ["busybox", "tftp", "-g", "-r", "undionly.kpxe", "-l",
                                str(fetched), "10.99.30.2"])
        assert fetched.read_bytes() == Path("/usr/lib/ipxe/undionly.kpxe").read_bytes()
        chain = requests.get(f"{service.url}/boot.ipxe", timeout=10).text
        assert chain.startswith("#!ipxe") and \
            f"{service.url}/boot/${{netX/mac:hexhyp}}.ipxe" in chain
        unknown = requests.get(f"{service.url}/boot/52-54-00-30-00-01.ipxe", timeout=10).text
        assert "needs the deploy_kernel and deploy_ramdisk settings" in unknown

        hosts = service.state_dir / "dhcp" / "dhcp-hosts"
        assert hosts.read_text() == ""
        node = service.post("/v1/nodes", {"driver": "wol", "name": "pc1"}).json()
        service.post("/v1/ports", {"address": "52:54:00:30:00:01", "node_uuid": node["uuid"]})
        wait_for(lambda: hosts.read_text() == "52:54:00:30:00:01\n", 15,
                 "the port in dnsmasq's hosts")
        assert "nothing to do" in requests.get(
            f"{service.url}/boot/52-54-00-30-00-01.ipxe", timeout=10).text
        service.proc.stop()
        conf = str(service.state_dir / "dhcp")  # this service's dnsmasq, not another's
        wait_for(lambda: not run_in(room.namespace, ["pgrep", "-f", conf],
                                    check=False).stdout.strip(), 10, "dnsmasq to stop")
