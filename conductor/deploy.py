"""Deploy, clean, inspect and undeploy: the work that needs the deploy agent.

Each flow has two halves (Ironic's shape). The first boots the node into the deploy
ramdisk and leaves it in a "wait" state without a lock. When the agent heartbeats, the API
hands the node back to its conductor with a "continue-*" action, which drives the agent's
commands (agent/api.py) and finishes the transition. Progress is written to the node's
deploy_step while the lock is held, so a teacher sees each seat's percentage.

How the image gets onto the disk is the node's deploy interface's business
(conductor/deploy_interfaces.py); each agent command runs through conductor/agent_steps.py.
"""
from __future__ import annotations

import logging
import secrets
import time
import uuid as uuidlib
from dataclasses import dataclass
from typing import Any, Callable

from sqlalchemy import select, update

from labmetal import states
from labmetal.agent.command_params import (ExportIscsi, PowerOff, Reboot, UnexportIscsi,
                                           WipeMetadata)
from labmetal.conductor import deploy_interfaces
from labmetal.conductor.actions import NodeWork, Outcome
from labmetal.conductor.agent_steps import DeployError, check_trusted, run_agent_command
from labmetal.conductor.power.base import InvalidDriverInfo, PowerError
from labmetal.config import DeploySettings
from labmetal.db import Database
from labmetal.images.inspect import ImageRejected
from labmetal.images.registry import ingest
from labmetal.images.store import ImageStore
from labmetal.lifecycles import IMAGE_QUEUED
from labmetal.lookup import NOT_ACTIVE, WRONG_KIND, ImageUnusable, usable_image
from labmetal.models import Image, Node, Port
from labmetal.names import seat_iqn
from labmetal.secrets import SecretBox

LOG = logging.getLogger(__name__)
DISK_IMAGE_KINDS = ("whole-disk", "partition")


@dataclass
class DeployContext:
    settings: DeploySettings
    db: Database
    box: SecretBox
    hostname: str
    store: ImageStore

    def save_step(self, node_id: int, step: dict[str, Any]) -> None:
        """Progress of the running step, written only while this conductor holds the lock."""
        with self.db.write() as session:
            session.execute(update(Node).where(Node.id == node_id,
                                               Node.reservation == self.hostname)
                            .values(deploy_step=step))

    def image(self, ident: str | None, kinds: tuple[str, ...], what: str) -> Image:
        if not ident:
            raise DeployError(f"no {what} is set")
        try:
            with self.db.read() as session:
                return usable_image(session, ident, kinds)
        except ImageUnusable as error:
            if error.problem == WRONG_KIND:
                raise DeployError(f"{what} {error.name} is a {error.kind} image; expected "
                                  f"{' or '.join(kinds)}") from None
            if error.problem == NOT_ACTIVE:
                raise DeployError(f"{what} {error.name} has no data yet (status "
                                  f"{error.status})") from None
            raise DeployError(f"{what} {ident!r} is not in the image store") from None

    def held_here(self, image: Image) -> None:
        """This conductor reads a disk image itself (the receipt check, a multicast
        sender): on a host whose store lacks it, the deploy fails saying so rather than with
        an internal error. Hosts share the API's image directory until images are kept in
        Ceph (issue 17)."""
        if not self.store.raw_path(image.uuid).exists():
            raise DeployError(f"image {image.name} is not in this conductor's image store "
                              f"({self.store.root} on {self.hostname}): every host that runs "
                              "a conductor needs the image directory (image_dir) that the "
                              "API stores uploads in")

    def image_by_id(self, image_id: int | None) -> Image | None:
        if image_id is None:
            return None
        with self.db.read() as session:
            return session.get(Image, image_id)

    def file_url(self, image: Image, name: str) -> str:
        return f"{self.settings.seat_base_url}/files/images/{image.uuid}/{name}"

    def manifest_url(self, image: Image) -> str:
        return self.file_url(image, "manifest")


def _failure(work: NodeWork, message: str) -> Outcome:
    state = states.FAILURE_STATE.get(work.node.provision_state, work.node.provision_state)
    return Outcome({"provision_state": state, "target_provision_state": None,
                    "last_error": message, "agent_url": None, "agent_token": None,
                    "agent_token_given": False, "agent_address": None, "agent_alarm": None},
                   [("provisioning", "ERROR", message),
                    ("provisioning", "INFO", f"{work.node.provision_state} -> {state}")])


# -- first half: boot the ramdisk --------------------------------------------------------
def boot_ramdisk(work: NodeWork, wait_state: str, step: str) -> Outcome:
    """PXE-boot the node into the deploy ramdisk with a fresh one-time agent token."""
    ctx = work.ctx
    info = work.node.driver_info or {}
    ctx.image(info.get("deploy_kernel") or ctx.settings.deploy_kernel, ("kernel",),
              "deploy kernel")
    ctx.image(info.get("deploy_ramdisk") or ctx.settings.deploy_ramdisk, ("ramdisk",),
              "deploy ramdisk")
    if not work.target.macs:
        raise DeployError("the node has no port with pxe_enabled: add its MAC address "
                          "(baremetal port create <MAC> --node <node>) so it can PXE-boot")
    power = work.driver.power
    try:
        power.set_boot_device(work.target, "pxe")
        if power.assumed_state or work.node.power_state != states.POWER_ON:
            new_power = power.set_power_state(work.target, states.POWER_ON)
        else:
            new_power = power.set_power_state(work.target, states.REBOOTING)
    except (PowerError, InvalidDriverInfo) as error:
        raise DeployError(f"cannot boot the node into the deploy ramdisk: {error}") from None
    token = secrets.token_urlsafe(32)
    return Outcome({"provision_state": wait_state, "power_state": new_power,
                    "agent_url": None, "agent_heartbeat_at": None,
                    "agent_token": ctx.box.seal(token), "agent_token_given": False,
                    "agent_address": None, "agent_alarm": None,
                    "deploy_step": {"step": step, "id": str(uuidlib.uuid4()),
                                    "started_at": time.time()}},
                   [("provisioning", "INFO",
                     f"{work.node.provision_state} -> {wait_state}: booting the deploy "
                     f"ramdisk ({step})")])


def deploy(work: NodeWork) -> Outcome:
    """available/active/deploy failed -> deploying -> wait call-back."""
    try:
        _instance_image(work)
        return boot_ramdisk(work, states.DEPLOY_WAIT, "write image")
    except DeployError as error:
        return _failure(work, f"Deploy failed: {error}")


def undeploy(work: NodeWork) -> Outcome:
    """active -> deleting -> clean wait: the agent erases the disk's metadata, so the
    seat's next boot no longer finds the old OS."""
    try:
        return boot_ramdisk(work, states.CLEAN_WAIT, "erase disk metadata")
    except DeployError as error:
        return _failure(work, f"Undeploy failed: {error}")


def clean(work: NodeWork) -> Outcome:
    """manageable -> cleaning -> available; with automated cleaning on, through the agent."""
    if not work.ctx.settings.automated_clean:
        return Outcome({"provision_state": states.AVAILABLE, "target_provision_state": None,
                        "last_error": None},
                       [("provisioning", "INFO", "cleaning -> available (automated cleaning "
                                                 "is off)")])
    try:
        return boot_ramdisk(work, states.CLEAN_WAIT, "erase disk metadata")
    except DeployError as error:
        return _failure(work, f"Cleaning failed: {error}")


def inspect(work: NodeWork) -> Outcome:
    try:
        return boot_ramdisk(work, states.INSPECT_WAIT, "inspect hardware")
    except DeployError as error:
        return _failure(work, f"Inspection failed: {error}")


# -- second half: the agent called back ----------------------------------------------------
def _instance_image(work: NodeWork) -> Image:
    source = (work.node.instance_info or {}).get("image_source")
    image = work.ctx.image(source, DISK_IMAGE_KINDS, "instance_info.image_source")
    work.ctx.held_here(image)
    return image


def _reboot_into(work: NodeWork, device: str) -> str:
    """Boot from `device` next; reboot out of band, or in-band through the agent (WoL)."""
    power = work.driver.power
    power.set_boot_device(work.target, device)
    if power.assumed_state:
        run_agent_command(work, Reboot(), "reboot", wait=False)
        return states.POWER_ON
    return power.set_power_state(work.target, states.REBOOTING)


def _power_off(work: NodeWork) -> str:
    power = work.driver.power
    if power.assumed_state:
        run_agent_command(work, PowerOff(), "power off", wait=False)
        return states.POWER_OFF
    return power.set_power_state(work.target, states.POWER_OFF)


_DONE_WITH_AGENT: dict[str, Any] = {
    "agent_url": None, "agent_token": None, "agent_token_given": False, "agent_address": None,
    "agent_alarm": None, "deploy_step": {}, "target_provision_state": None, "last_error": None}


def continue_deploy(work: NodeWork) -> Outcome:
    try:
        image = _instance_image(work)
        interface = deploy_interfaces.for_node(work.node)
        interface.validate(work, image)
        written = interface.write_image(work, image)
        work.ctx.save_step(work.node.id, {"step": states.BOOT_WRITTEN_DISK})
        # The network stays first, as on a room PC: the seat's script (now "the local disk")
        # sends it to its disk, and a later deploy, inspection or session needs no change
        # of its boot order. Under Secure Boot the firmware checks the disk's loader itself.
        power_state = _reboot_into(work, "pxe")
    except (DeployError, PowerError, InvalidDriverInfo) as error:
        return _failure(work, f"Deploy failed: {error}")
    return Outcome({**_DONE_WITH_AGENT, "provision_state": states.ACTIVE,
                    "power_state": power_state},
                   [("deployment", "INFO", f"image {image.name} written and verified "
                                           f"({image.raw_sha256[:12]}{written}); booting it"),  # type: ignore[index]
                    ("provisioning", "INFO", "deploying -> active")])


def continue_clean(work: NodeWork) -> Outcome:
    try:
        run_agent_command(work, WipeMetadata(), "erase disk metadata")
        power_state = _power_off(work)
    except (DeployError, PowerError, InvalidDriverInfo) as error:
        return _failure(work, f"Cleaning failed: {error}")
    return Outcome({**_DONE_WITH_AGENT, "provision_state": states.AVAILABLE,
                    "power_state": power_state, "instance_info": {}},
                   [("provisioning", "INFO", "disk metadata erased; cleaning -> available")])


def continue_inspect(work: NodeWork) -> Outcome:
    inventory = work.node.inventory or {}
    try:
        check_trusted(work)
        if not inventory:
            raise DeployError("the agent sent no inventory")
        properties = {**(work.node.properties or {}), **inventory_properties(inventory)}
        added = add_ports(work.ctx, work.node.id, inventory)
        power_state = _power_off(work)
    except (DeployError, PowerError, InvalidDriverInfo) as error:
        return _failure(work, f"Inspection failed: {error}")
    return Outcome({**_DONE_WITH_AGENT, "provision_state": states.MANAGEABLE,
                    "power_state": power_state, "properties": properties},
                   [("inspection", "INFO",
                     f"inventory stored: {_summary(properties)}"
                     + (f"; ports added: {', '.join(added)}" if added else "")),
                    ("provisioning", "INFO", "inspecting -> manageable")])


def capture(work: NodeWork) -> Outcome:
    """manageable -> capturing -> capture wait: boot the reference PC into the agent."""
    try:
        return boot_ramdisk(work, states.CAPTURE_WAIT, "capture disk")
    except DeployError as error:
        return _capture_failed(work, str(error))


def continue_capture(work: NodeWork) -> Outcome:
    """The agent exports the disk over iSCSI; the conductor reads it whole into a new image,
    checked and stored like an upload."""
    from labmetal.conductor.iscsi_writer import capture_over_iscsi
    ctx = work.ctx
    image_uuid = work.driver_internal_info.get("capture_image")
    with ctx.db.read() as session:
        image = session.scalar(select(Image).where(Image.uuid == image_uuid))
    if image is None:
        return _capture_failed(work, "the image to capture into was deleted")
    iqn = seat_iqn(work.node.uuid)
    incoming = ctx.store.root / ".incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    disk = incoming / f"capture-{work.node.uuid}.raw"
    try:
        export = run_agent_command(work, ExportIscsi(iqn=iqn), "export disk over iSCSI")
        try:
            def progress(done: int, total: int) -> None:
                ctx.save_step(work.node.id, {**(work.node.deploy_step or {}),
                                             "step": "read disk over iSCSI", "done": done,
                                             "total": total})
            capture_over_iscsi(export["portal"], export["iqn"], int(export.get("lun", 1)), disk,
                               progress_callback=progress)
        finally:
            run_agent_command(work, UnexportIscsi(iqn=iqn), "unexport disk")
        with open(disk, "rb") as stream:
            stored = ingest(ctx.db, ctx.store, image, stream)
        power_state = _power_off(work)
    except (DeployError, PowerError, InvalidDriverInfo, ImageRejected, OSError,
            RuntimeError) as error:
        return _capture_failed(work, str(error))
    finally:
        disk.unlink(missing_ok=True)
    return Outcome({**_DONE_WITH_AGENT, "provision_state": states.MANAGEABLE,
                    "power_state": power_state,
                    "driver_internal_info": _without_capture(work)},
                   [("capture", "INFO", f"disk captured as image {stored.name} "
                                        f"({stored.virtual_size} bytes, sha256 "
                                        f"{(stored.raw_sha256 or '')[:12]})"),
                    ("provisioning", "INFO", "capturing -> manageable")])


def _without_capture(work: NodeWork) -> dict[str, Any]:
    return {k: v for k, v in work.driver_internal_info.items() if k != "capture_image"}


def _capture_failed(work: NodeWork, message: str) -> Outcome:
    """Back to manageable; the queued image is removed so its name can be used again."""
    image_uuid = work.driver_internal_info.get("capture_image")
    with work.ctx.db.write() as session:
        image = session.scalar(select(Image).where(Image.uuid == image_uuid,
                                                   Image.status == IMAGE_QUEUED))
        if image is not None:
            session.delete(image)
    outcome = _failure(work, f"Capture failed: {message}")
    outcome.values["driver_internal_info"] = _without_capture(work)
    return outcome


def inventory_properties(inventory: dict[str, Any]) -> dict[str, Any]:
    """Ironic's scheduling properties from an agent inventory."""
    properties: dict[str, Any] = {}
    cpu = inventory.get("cpu") or {}
    if cpu.get("count"):
        properties["cpus"] = cpu["count"]
    if cpu.get("architecture"):
        properties["cpu_arch"] = cpu["architecture"]
    memory = inventory.get("memory") or {}
    if memory.get("total"):
        properties["memory_mb"] = int(memory["total"]) // (1024 * 1024)
    disks = [d for d in inventory.get("disks") or [] if d.get("size")]
    install = [d for d in disks if d.get("name") == inventory.get("install_disk")]
    if install or disks:  # the disk the agent would write to, as Ironic's root device
        properties["local_gb"] = max(int(d["size"]) for d in install or disks) // (1024 ** 3)
    return properties


def _summary(properties: dict[str, Any]) -> str:
    return ", ".join(f"{key}={properties[key]}" for key in ("cpus", "cpu_arch", "memory_mb",
                                                             "local_gb") if key in properties)


def inventory_macs(inventory: dict[str, Any]) -> list[str]:
    return sorted({str(nic["mac_address"]).lower() for nic in inventory.get("interfaces") or []
                   if nic.get("mac_address")})


def add_ports(ctx: DeployContext, node_id: int, inventory: dict[str, Any]) -> list[str]:
    """Ports for the MACs the agent saw that no node has yet."""
    added = []
    with ctx.db.write() as session:
        known = set(session.scalars(select(Port.address)))
        for mac in inventory_macs(inventory):
            if mac not in known:
                session.add(Port(address=mac, node_id=node_id, pxe_enabled=True))
                added.append(mac)
    return added


DEPLOY_ACTIONS: dict[str, Callable[[NodeWork], Outcome]] = {
    "deploy": deploy,
    "undeploy": undeploy,
    "clean": clean,
    "inspect": inspect,
    "continue-deploy": continue_deploy,
    "continue-clean": continue_clean,
    "continue-inspect": continue_inspect,
    "capture": capture,
    "continue-capture": continue_capture,
}

# The action the API asks for when the agent of a node in a wait state calls back.
CONTINUE_ACTION = {states.DEPLOY_WAIT: "continue-deploy", states.CLEAN_WAIT: "continue-clean",
                   states.INSPECT_WAIT: "continue-inspect",
                   states.CAPTURE_WAIT: "continue-capture"}
