"""iPXE over HTTP: /boot.ipxe for every PC, then /boot/<mac>.ipxe rendered from the node's
state at the moment it asks (DESIGN §4): no per-conductor files to rebuild on takeover."""
from __future__ import annotations

from flask import Blueprint, Response
from sqlalchemy import select

from labmetal import states
from labmetal.api.app import services
from labmetal.api.auth import public
from labmetal.api.errors import not_found
from labmetal.models import Image, Node, Port
from labmetal.pxe.ipxe import (BootScript, ChainScript, IdleScript, LocalDiskScript,
                               RamdiskScript, script_mac)

blueprint = Blueprint("boot", __name__)
RAMDISK_MODE = {states.DEPLOYING: "deploy", states.DEPLOY_WAIT: "deploy",
                states.CLEANING: "clean", states.CLEAN_WAIT: "clean", states.DELETING: "clean",
                states.INSPECTING: "inspect", states.INSPECT_WAIT: "inspect",
                states.CAPTURING: "deploy", states.CAPTURE_WAIT: "deploy"}


def _ipxe(script: BootScript) -> Response:
    return Response(script.render(), mimetype="text/plain")


@blueprint.get("/boot.ipxe")
@public("seats boot from it before anyone logs in")
def chain():
    return _ipxe(ChainScript(services().settings.seat_base_url))


@blueprint.get("/boot/<name>")
@public("seats boot from it before anyone logs in")
def per_mac(name: str):
    mac = script_mac(name)
    if mac is None:
        raise not_found(f"{name} is not a per-MAC boot script (expected aa-bb-cc-dd-ee-ff.ipxe)")
    return _ipxe(script_for(mac))


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
    if node.provision_state in RAMDISK_MODE:
        return _ramdisk(node, RAMDISK_MODE[node.provision_state], mac) or IdleScript(
            f"node {node.name or node.uuid} needs a deploy kernel and ramdisk")
    if node.provision_state == states.ACTIVE:
        return LocalDiskScript(node.name or node.uuid)
    return IdleScript(f"node {node.name or node.uuid} is {node.provision_state}: nothing to do")


def _ramdisk(node: Node | None, mode: str, mac: str) -> RamdiskScript | None:
    svc = services()
    info = node.driver_info if node is not None else {}
    images = []
    for key in ("deploy_kernel", "deploy_ramdisk"):
        ident = (info or {}).get(key) or getattr(svc.settings, key)
        with svc.db.read() as session:
            image = session.scalar(select(Image).where(
                (Image.name == ident) | (Image.uuid == ident), Image.status == "active"))
        if image is None:
            return None
        images.append(image)
    base = svc.settings.seat_base_url
    return RamdiskScript(kernel_url=f"{base}/files/images/{images[0].uuid}/file",
                         ramdisk_url=f"{base}/files/images/{images[1].uuid}/file",
                         api_url=base, mode=mode,  # type: ignore[arg-type]
                         node=(node.name or node.uuid) if node is not None else mac)
