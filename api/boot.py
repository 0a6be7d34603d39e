"""Boot scripts over HTTP: /boot.ipxe for every PC, then /boot/<mac>.ipxe rendered from the
node's state at the moment it asks (DESIGN §4): no per-conductor files to rebuild on
takeover. /boot/<mac>.grub renders the same decision for GRUB (Secure Boot seats; the
conductor's TFTP relays it, as GRUB has no HTTP)."""
from __future__ import annotations

import logging
from dataclasses import replace

from flask import Blueprint, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from labmetal import states
from labmetal.api.services import services
from labmetal.api.auth import public
from labmetal.api.errors import not_found
from labmetal.api.seat_address import caller_address, holds_lease, leases_known
from labmetal.api.sessions import storage
from labmetal.errors import Refused
from labmetal.images.overlays.base import OverlayError
from labmetal.api.validation import produces
from labmetal.lifecycles import IMAGE_ACTIVE, SESSION_RUNNING
from labmetal.lookup import ImageUnusable, usable_image
from labmetal.names import seat_iqn
from labmetal.models import (Image, Node, Port, Room, Seat, StudentSession, Template,
                             TemplateVersion, User)
from labmetal.pxe import grub
from labmetal.tls import ca_pin
from labmetal.pxe.ipxe import (BootScript, ChainScript, IdleScript, LeaseWaitScript,
                               LocalSessionScript,
                               LocalDiskScript, OwnKernel, RamdiskScript, SanbootScript,
                               SeatMenuScript, script_mac)

LOG = logging.getLogger(__name__)
blueprint = Blueprint("boot", __name__)


def ipxe_response(script: BootScript) -> Response:
    return Response(script.render(), mimetype="text/plain")


def mac_path(mac: str) -> str:
    """The folder of a PC's scripts under the seat URL: boot/52-54-00-12-34-56."""
    return f"boot/{mac.replace(':', '-')}"


@blueprint.get("/boot.ipxe")
@public("seats boot from it before anyone logs in")
@produces("text/plain")
def chain():
    return ipxe_response(ChainScript(services().settings.seat_base_url))


@blueprint.get("/boot/<name>")
@public("seats boot from it before anyone logs in")
@produces("text/plain")
def per_mac(name: str):
    stem, dot, suffix = name.rpartition(".")
    mac = script_mac(f"{stem}.ipxe") if dot and suffix in ("ipxe", "grub") else None
    if mac is None:
        raise not_found(f"{name} is not a per-MAC boot script (expected "
                        "aa-bb-cc-dd-ee-ff.ipxe or .grub)")
    if suffix == "grub":
        return Response(grub.render(script_for(mac), mac), mimetype="text/plain")
    return ipxe_response(script_for(mac))


def script_for(mac: str) -> BootScript:
    svc = services()
    with svc.db.read() as session:
        port = session.scalar(select(Port).where(Port.address == mac))
        node = session.get(Node, port.node_id) if port is not None else None
    if node is None:
        if svc.settings.self_registration:
            return _ramdisk(None, "discovery", mac) or IdleScript(
                f"{mac} is not enrolled; self-registration needs the deploy_kernel and "
                "deploy_ramdisk settings")
        return IdleScript(f"this PC ({mac}) is not enrolled in labmetal")
    if (node.provision_state == states.DEPLOYING
            and (node.deploy_step or {}).get("step") == states.BOOT_WRITTEN_DISK):
        return LocalDiskScript(node.name or node.uuid)
    if node.provision_state in states.RAMDISK_MODE:
        return _ramdisk(node, states.RAMDISK_MODE[node.provision_state], mac) or IdleScript(
            f"node {node.name or node.uuid} needs a deploy kernel and ramdisk")
    local = _local_session(node, mac)
    if local is not None:
        return local
    session_boot = _session(node)
    if session_boot is not None:
        return session_boot
    name = node.name or node.uuid
    default: LocalDiskScript | IdleScript
    if node.provision_state == states.ACTIVE:
        default, label = LocalDiskScript(name), "Boot the local disk"
    else:
        default = IdleScript(f"node {name} is {node.provision_state}: nothing to do")
        label = "Continue without a session"
    if _open_for_tp(node) and _login_possible():
        # a room open for a TP: the seat goes straight to the login, no menu to race
        straight = login_ramdisk(mac)
        if straight is not None:
            return straight
    login = login_ramdisk(mac) if _offers_login() else None
    if login is None:
        return default
    return SeatMenuScript(svc.settings.seat_base_url, mac_path(mac), name, default, label,
                          svc.settings.seat_menu_timeout, login)


def _login_possible() -> bool:
    """A seat login needs accounts and HTTPS for the password."""
    svc = services()
    return svc.settings.auth != "noauth" and svc.settings.seat_https_url is not None


def _open_for_tp(node: Node) -> bool:
    with services().db.read() as session:
        return session.scalar(select(Room.tp_template_id).join(Seat, Seat.room_id == Room.id)
                              .where(Seat.node_id == node.id)) is not None


def _offers_login() -> bool:
    """The seat menu's login, where there are accounts, HTTPS for the password and a
    template to start from."""
    svc = services()
    if not _login_possible() or svc.settings.seat_menu_timeout <= 0:
        return False
    with svc.db.read() as session:
        return session.scalar(select(Template.id).where(Template.versions.any())
                              .limit(1)) is not None


def _local_session(node: Node, mac: str) -> LocalSessionScript | RamdiskScript | IdleScript | None:
    """A local session on this seat (issue 16): labmetal's ramdisk in ``session`` mode
    while its cache has work (a session to put there, or one to bring back), then the
    session itself, from the seat's disk (conductor/seat_sync.py)."""
    svc = services()
    with svc.db.read() as session:
        if svc.seat_sync.has_work(session, node):
            work = True
        else:
            work, boot = False, svc.seat_sync.local_boot(session, node)
            student = session.scalar(
                select(User.name).join(StudentSession, StudentSession.user_id == User.id)
                .where(StudentSession.seat_node_id == node.id,
                       StudentSession.state == SESSION_RUNNING))
    if work:
        return _ramdisk(node, "session", mac) or IdleScript(
            f"node {node.name or node.uuid}'s local session needs the deploy kernel and "
            "ramdisk")
    if boot is None:
        return None
    base = svc.settings.seat_base_url
    return LocalSessionScript(f"{base}/files/images/{boot.kernel}/file",
                              f"{base}/files/images/{boot.initramfs}/file", boot.args,
                              student or "")


def _session(node: Node) -> SanbootScript | LeaseWaitScript | IdleScript | None:
    """The student's session running on this seat, if any: the seat boots its disk. Its
    script holds the session's CHAP secret, so it goes to the seat alone: the address
    leased to the seat's MAC, or (where labmetal leases nothing) the first to ask for it
    after the start (DESIGN §11). Another address is told to ask again shortly: the seat
    itself may have asked before its fresh lease reached the database."""
    svc = services()
    address = caller_address()
    with svc.db.write() as session:
        row = session.execute(
            select(StudentSession, User.name).join(User, User.id == StudentSession.user_id)
            .where(StudentSession.seat_node_id == node.id,
                   StudentSession.state == SESSION_RUNNING)).first()
        if row is None:
            return None
        ses, student = row
        portal, iqn = ses.target_portal, ses.target_iqn
        if not portal or not iqn:
            return None
        macs = session.scalars(select(Port.address).where(Port.node_id == node.id)).all()
        if leases_known(svc.settings.boot):
            allowed = holds_lease(session, macs, address)
        else:
            if ses.seat_address is None:
                ses.seat_address = address
            allowed = ses.seat_address == address
        if not allowed:
            LOG.warning("session %s's boot script refused to %s: not seat %s's address",
                        ses.uuid, address, node.name or node.uuid)
            return LeaseWaitScript(svc.settings.seat_base_url,
                                   f"this address ({address}) is not seat "
                                   f"{node.name or node.uuid}'s (yet)")
        chap_user, sealed = ses.chap_user, ses.chap_secret
        session_uuid = ses.uuid
        own_kernel = _own_kernel(session, ses.template_version)
    try:  # the CHAP account goes to this address: the target lets in this address alone
        storage().admit_only(session_uuid, address)
    except (Refused, OverlayError) as error:
        LOG.warning("session %s's target could not be bound to %s: %s", session_uuid,
                    address, error)
        return LeaseWaitScript(svc.settings.seat_base_url,
                               "the session's disk is not ready for this seat")
    host, _, port = portal.rpartition(":")
    return SanbootScript(host, int(port), iqn, seat_iqn(node.uuid), chap_user,
                         svc.box.open(sealed), student, own_kernel=own_kernel)


def _own_kernel(session: Session, version: TemplateVersion) -> OwnKernel | None:
    """The template version's own kernel and initrd, for a Secure Boot seat's GRUB
    (images/boot_files.py); None if it has none (or they were deleted since)."""
    if not (version.boot_kernel and version.boot_initrd and version.boot_root_uuid):
        return None
    active = set(session.scalars(select(Image.uuid).where(
        Image.uuid.in_([version.boot_kernel, version.boot_initrd]),
        Image.status == IMAGE_ACTIVE)))
    if active != {version.boot_kernel, version.boot_initrd}:
        return None
    base = services().settings.seat_base_url
    return OwnKernel(f"{base}/files/images/{version.boot_kernel}/file",
                     f"{base}/files/images/{version.boot_initrd}/file", version.boot_root_uuid)


def login_ramdisk(mac: str) -> RamdiskScript | None:
    """labmetal's ramdisk in ``login`` mode for the seat ``mac``: told where labmetal's
    HTTPS is and (for labmetal's own CA) the CA's fingerprint, which it checks before it
    sends a password (agent/seat_login.py). None without HTTPS or without the ramdisk."""
    svc = services()
    https = svc.settings.seat_https_url
    if https is None:
        return None
    args = [f"labmetal.tls={https}"]
    if svc.settings.seat_language in ("en", "fr"):
        args.append(f"labmetal.lang={svc.settings.seat_language}")
    if svc.settings.tls_cert is None:  # labmetal's own CA (an operator's is known already)
        ca_cert = svc.settings.tls_dir / "ca.crt"
        if not ca_cert.exists():
            return None
        args.append(f"labmetal.ca={ca_pin(ca_cert)}")
    with svc.db.read() as session:
        port = session.scalar(select(Port).where(Port.address == mac))
        node = session.get(Node, port.node_id) if port is not None else None
    script = _ramdisk(node, "login", mac)
    return None if script is None else replace(script, kernel_args=(*script.kernel_args, *args))


def _ramdisk(node: Node | None, mode: str, mac: str) -> RamdiskScript | None:
    svc = services()
    info = node.driver_info if node is not None else {}
    images = []
    for key in ("deploy_kernel", "deploy_ramdisk"):
        ident = (info or {}).get(key) or getattr(svc.settings, key)
        if not ident:
            return None
        try:
            with svc.db.read() as session:
                images.append(usable_image(session, ident))
        except ImageUnusable:
            return None
    base = svc.settings.seat_base_url
    return RamdiskScript(kernel_url=f"{base}/files/images/{images[0].uuid}/file",
                         ramdisk_url=f"{base}/files/images/{images[1].uuid}/file",
                         api_url=base, mode=mode,  # type: ignore[arg-type]
                         node=(node.name or node.uuid) if node is not None else mac)
