"""Virtual BMCs: IPMI over UDP (pyghmi's server side) in front of lab machines.

One process can host many BMCs on consecutive ports: pyghmi serves every BMC socket of a
process from one event loop.
"""
from __future__ import annotations

import logging
import select
import socket
from typing import Iterable

import pyghmi.ipmi.bmc as pyghmi_bmc
import pyghmi.ipmi.private.constants as ipmi_constants
import pyghmi.ipmi.private.serversession as serversession
import pyghmi.ipmi.private.session as ipmi_session

from labmetal.lab.machine import Machine

LOG = logging.getLogger(__name__)

RAKP_HMAC_SHA1 = 1
NO_MATCHING_AUTH_PAYLOAD = 0x11
UNAUTHORIZED_NAME = 0x0D


class LabServerSession(serversession.ServerSession):
    """pyghmi's server session, fixed where real clients fail against it that make real clients
    work against it:

    - it only speaks RAKP-HMAC-SHA1 (cipher suite 3) but accepted any proposal, so clients
      that start with suite 17 (pyghmi's own, ipmitool's default) failed in RAKP2; refusing
      other proposals with status 0x11 makes them fall back to suite 3;
    - an unknown user name got no answer at all (the client waited and called the BMC
      dead); answering "unauthorized name" lets the client report an authentication error;
    - a packet from a client address it no longer knows (a new client on a reused UDP
      port) was handed to a method only client sessions have, killing the event loop; it
      goes to the BMC, which opens a new session for it.

    Sessions are also forgotten when the client closes them; pyghmi kept every session
    ever opened and routed a later client that reused the address to the stale one, which
    then wiped the live sessions of other BMCs on that address.
    """

    def sessionless_data(self, data, sockaddr):
        self.bmc.sessionless_data(data, sockaddr)

    def _forget(self):
        handlers = ipmi_session.Session.bmc_handlers.get(self.sockaddr)
        if handlers is not None and handlers.get(self.bmc.port) is self:
            del handlers[self.bmc.port]
            if not handlers:
                del ipmi_session.Session.bmc_handlers[self.sockaddr]

    def close_server_session(self):
        self._forget()

    def _handle_ipmi_packet(self, data, sockaddr=None, qent=None):
        if data[4] in (0, 2) and bytes(data[5:13]) == bytes(8):
            # sessionless IPMI 1.5 (a new client's first packet): not ours any more
            self._forget()
            self.bmc.sessionless_data(data, sockaddr)
            return None
        return super()._handle_ipmi_packet(data, sockaddr, qent)

    def _got_rmcp_openrequest(self, data):
        if self.sessionid:  # established: this is a new login from the same address
            self._forget()
            LabServerSession(self.authdata, self.kg, self.sockaddr, self.socket, data,
                             self.uuid, self.bmc)
            return
        super()._got_rmcp_openrequest(data)

    def create_open_session_response(self, request):
        auth_algorithm = request[12] if len(request) > 12 else RAKP_HMAC_SHA1
        if auth_algorithm != RAKP_HMAC_SHA1:
            return bytearray([request[0], NO_MATCHING_AUTH_PAYLOAD, 0, 0]) + request[4:8]
        return super().create_open_session_response(request)

    def _got_rakp1(self, data):
        name_present = len(data) > 27 and data[27]
        if name_present and self.authdata.get(bytes(data[28:]).decode("utf-8", "replace")) is None:
            reply = bytearray([data[0], UNAUTHORIZED_NAME, 0, 0]) + self.clientsessionid
            self.send_payload(reply, ipmi_constants.payload_types["rakp2"], retry=False)
            return
        super()._got_rakp1(data)


# IpmiServer builds its sessions through this module-level name.
serversession.ServerSession = LabServerSession


class VirtualBmc(pyghmi_bmc.Bmc):
    def __init__(self, machine: Machine, user: str, password: str, port: int,
                 address: str = "127.0.0.1"):
        super().__init__({user: password}, port=port, address=address)
        self.machine = machine

    def get_power_state(self):
        return "on" if self.machine.is_on() else "off"

    def power_on(self):
        self.machine.power_on()

    def power_off(self):
        self.machine.power_off()

    def power_shutdown(self):
        self.machine.power_off()

    def power_reset(self):
        self.machine.reset()

    def power_cycle(self):
        self.machine.reset()

    def get_boot_device(self):
        return self.machine.get_boot_device()

    def set_boot_device(self, bootdevice):
        self.machine.set_boot_device(bootdevice)

    def cold_reset(self):
        return 0


def serve_forever(bmcs: Iterable[VirtualBmc]) -> None:
    """Serve every BMC of this process from one plain select loop.

    pyghmi's own loop hands packets between its I/O thread and the caller and loses
    wake-ups under concurrent clients (all BMCs of the process then stall for seconds); the
    protocol handling is pyghmi's, the loop is ours: the BMC sockets are taken out of
    pyghmi's I/O thread and each packet is routed and answered at once.
    """
    bmcs = list(bmcs)
    by_socket = {bmc.serversocket: bmc for bmc in bmcs}
    for sock in by_socket:
        if sock in ipmi_session.iosockets:
            ipmi_session.iosockets.remove(sock)
    LOG.info("serving %d virtual BMC(s) on %s", len(bmcs),
             ", ".join(str(b.port) for b in bmcs[:5]) + (" ..." if len(bmcs) > 5 else ""))
    while True:
        readable, _, _ = select.select(list(by_socket), [], [], 5.0)
        for sock in readable:
            while True:
                try:
                    # pyghmi flips sockets to blocking when it sends: ask per call
                    data, client = sock.recvfrom(3000, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    break
                try:
                    _route(by_socket[sock], sock, data, client)
                except Exception:  # one bad packet must not take every BMC down
                    LOG.exception("virtual BMC %d: packet from %s dropped",
                                  by_socket[sock].port, client)


def _route(bmc: VirtualBmc, sock: socket.socket, data: bytes, client: tuple) -> None:
    if len(data) < 4:
        return
    session = ipmi_session.Session.bmc_handlers.get(client, {}).get(bmc.port)
    if session is not None:
        session.pktqueue.append((data, client, sock, True))
        session.process_pktqueue()
    else:
        bmc.pktqueue.append((data, client, sock, False))
        bmc.process_pktqueue()
