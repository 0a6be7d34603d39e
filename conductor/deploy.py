"""Deploy, clean, inspect and undeploy: the work that needs the deploy agent.

Each flow has two halves (Ironic's shape). The first boots the node into the deploy
ramdisk and leaves it in a "wait" state without a lock. When the agent heartbeats, the API
hands the node back to its conductor with a "continue-*" action, which drives the agent's
commands (agent/api.py) and finishes the transition. Progress is written to the node's
deploy_step while the lock is held, so a teacher sees each seat's percentage.
"""
from __future__ import annotations

import hmac
import logging
import os
import secrets
import time
import uuid as uuidlib
from dataclasses import dataclass
from typing import Any, Callable

from sqlalchemy import select, update

from labmetal import states
from labmetal.agent import proof
from labmetal.conductor.actions import NodeWork, Outcome
from labmetal.conductor.agent_client import AgentClient, AgentRefused, AgentUnreachable
from labmetal.conductor.power.base import InvalidDriverInfo, PowerError
from labmetal.config import Settings
from labmetal.db import Database
from labmetal.images.inspect import ImageRejected
from labmetal.images.registry import ingest
from labmetal.images.store import ImageStore
from labmetal.models import Image, Node, Port
from labmetal.secrets import SecretBox

LOG = logging.getLogger(__name__)
DISK_IMAGE_KINDS = ("whole-disk", "partition")


class DeployError(Exception):
    """A step failed; the message becomes the node's last_error."""


@dataclass
class DeployContext:
    settings: Settings
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
        with self.db.read() as session:
            column = Image.uuid if _looks_like_uuid(ident) else Image.name
            image = session.scalar(select(Image).where(column == ident))
        if image is None:
            raise DeployError(f"{what} {ident!r} is not in the image store")
        if image.status != "active":
            raise DeployError(f"{what} {image.name} has no data yet (status {image.status})")
        if image.kind not in kinds:
            raise DeployError(f"{what} {image.name} is a {image.kind} image; expected "
                              f"{' or '.join(kinds)}")
        return image

    def image_by_id(self, image_id: int | None) -> Image | None:
        if image_id is None:
            return None
        with self.db.read() as session:
            return session.get(Image, image_id)

    def file_url(self, image: Image, name: str) -> str:
        return f"{self.settings.seat_base_url}/files/images/{image.uuid}/{name}"

    def manifest_url(self, image: Image) -> str:
        return self.file_url(image, "manifest")


def _looks_like_uuid(text: str) -> bool:
    try:
        return str(uuidlib.UUID(text)) == text.lower()
    except ValueError:
        return False


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
def _agent(work: NodeWork) -> AgentClient:
    node = work.node
    if not node.agent_url or not node.agent_token:
        raise DeployError("the agent has not reported where it listens")
    check_trusted(work)
    return AgentClient(node.agent_url, work.ctx.box.open(node.agent_token))


def check_trusted(work: NodeWork) -> None:
    """A second lookup of this deploy's token raised an alarm (api/agent.py): whatever the
    agent says from now on may come from someone else."""
    with work.ctx.db.read() as session:
        alarm = session.scalar(select(Node.agent_alarm).where(Node.id == work.node.id))
    if alarm:
        raise DeployError(alarm)


def agent_says(text: object, limit: int = 200) -> str:
    """An agent's words for last_error and the history: its message, but printable, short,
    and marked as its own (the seat network is hostile: a seat's text is data)."""
    cleaned = "".join(ch if ch.isprintable() else " " for ch in str(text or ""))
    cleaned = " ".join(cleaned.split())
    if len(cleaned) > limit:
        cleaned = cleaned[:limit] + "..."
    return f"the agent reports: {cleaned!r}" if cleaned else "the agent gave no reason"


def run_agent_command(work: NodeWork, name: str, params: dict[str, Any],
                      step: str, wait: bool = True, key: str = "") -> dict[str, Any]:
    """Start (or find again, after a takeover) an agent command and wait for its end,
    saving progress. An agent that stops answering for agent_timeout fails the step.
    ``wait=False`` is for reboot and power off: accepted is all one can know, since the
    agent is gone (or a new one, with a new token, answers) once it has acted. ``key``
    makes the command a new one where re-sending the same would be wrong (a challenge:
    a conductor that took over asks its own)."""
    ctx = work.ctx
    client = _agent(work)
    step_id = (work.node.deploy_step or {}).get("id") or work.node.uuid
    timeout = ctx.settings.agent_timeout
    last_answer = time.monotonic()
    command = None
    saved_at = 0.0
    while True:
        try:
            command = (client.start(name, params, f"{step_id}:{name}{key}") if command is None
                       else client.get(command.id))
            last_answer = time.monotonic()
        except AgentRefused as error:
            raise DeployError(str(error)) from None
        except AgentUnreachable as error:
            if time.monotonic() - last_answer > timeout:
                raise DeployError(f"the agent vanished during {name}: no answer for "
                                  f"{timeout:.0f} s ({error})") from None
            time.sleep(1.0)
            continue
        if not wait:
            return command.result
        if command.status == "succeeded":
            check_trusted(work)
            ctx.save_step(work.node.id, {**(work.node.deploy_step or {}), "step": step,
                                         "done": command.total or command.done,
                                         "total": command.total})
            return command.result
        if command.status == "failed":
            raise DeployError(f"{name} failed on the node: {agent_says(command.error)}")
        if time.monotonic() - saved_at >= 1.0:
            ctx.save_step(work.node.id, {**(work.node.deploy_step or {}), "step": step,
                                         "done": command.done, "total": command.total})
            saved_at = time.monotonic()
        time.sleep(0.5)


def _instance_image(work: NodeWork) -> Image:
    source = (work.node.instance_info or {}).get("image_source")
    return work.ctx.image(source, DISK_IMAGE_KINDS, "instance_info.image_source")


def _write_direct(work: NodeWork, image: Image) -> dict[str, Any]:
    ctx = work.ctx
    info = work.node.instance_info or {}
    params = {"manifest_url": ctx.manifest_url(image), "packed_url": ctx.file_url(image, "packed"),
              "readback": bool(info.get("verify_readback"))}
    if info.get("multicast"):  # a room job's seat: the chunks come from the job's group
        params["multicast"] = info["multicast"]
    if image.kind == "whole-disk":
        result = run_agent_command(work, "write_image", params, "write image")
        _check_written(work, image, result)
        return result
    kernel = ctx.image_by_id(image.kernel_id)
    ramdisk = ctx.image_by_id(image.ramdisk_id)
    if kernel is None or ramdisk is None:
        raise DeployError(f"partition image {image.name} lost its kernel or ramdisk")
    info = work.node.instance_info or {}
    # auto: as the PC booted the ramdisk (BIOS or UEFI)
    params["boot_mode"] = info.get("boot_mode", "auto")
    result = run_agent_command(work, "deploy_partition_image", params, "write image")
    _check_written(work, image, result)  # before the boot loader changes the file system
    boot = run_agent_command(work, "install_bootloader", {
        "kernel_url": ctx.file_url(kernel, "file"), "ramdisk_url": ctx.file_url(ramdisk, "file"),
        "kernel_cmdline": info.get("kernel_append_params", "console=ttyS0")},
        "install the boot loader")
    return {**result, **boot}


def _check_written(work: NodeWork, image: Image, result: dict[str, Any]) -> None:
    if result.get("raw_sha256") != image.raw_sha256:
        raise DeployError("the agent's sha256 of what it wrote is not the image's "
                          f"({image.raw_sha256[:12]})")
    _check_receipt(work, image)


def _check_receipt(work: NodeWork, image: Image) -> None:
    """The disk holds the image: a fresh challenge over random extents, answered from the
    disk, checked against the store's copy (agent/proof.py). The sha256 above is public;
    this answer cannot be made without the bytes."""
    raw = str(work.ctx.store.raw_path(image.uuid))
    challenge = proof.challenge(os.path.getsize(raw))
    answer = run_agent_command(work, "prove_disk", challenge.params(), "prove the write",
                               key=f":{challenge.nonce[:16]}")
    expected = proof.digest(raw, 0, challenge)
    given = answer.get("hmac")
    if not (isinstance(given, str) and hmac.compare_digest(given, expected)):
        raise DeployError("the disk's answer to the receipt challenge does not match the "
                          "image: the write cannot be verified")


def _chunks_written(result: dict[str, Any], info: dict[str, Any]) -> str:
    """"; 3 of 64 chunks written" for the history: a delta re-image shows what it spared."""
    try:
        written, total = int(result.get("chunks_written") or 0), int(result["chunks_total"])
    except (KeyError, TypeError, ValueError):
        return ""
    source = " from multicast" if info.get("multicast") else ""
    return f"; {written} of {total} chunks written{source}"


def _write_iscsi(work: NodeWork, image: Image) -> None:
    """The agent exports its disk; the conductor writes the image into it with qemu-img."""
    from labmetal.conductor.iscsi_writer import write_image_over_iscsi
    if image.kind != "whole-disk":
        raise DeployError("the iscsi deploy interface writes whole-disk images; use "
                          "deploy_interface direct for partition images")
    iqn = f"iqn.2026-11.org.labmetal:{work.node.uuid}"
    export = run_agent_command(work, "export_iscsi", {"iqn": iqn}, "export disk over iSCSI")
    try:
        def progress(done: int, total: int) -> None:
            work.ctx.save_step(work.node.id, {**(work.node.deploy_step or {}),
                                              "step": "write image over iSCSI",
                                              "done": done, "total": total})
        write_image_over_iscsi(work.ctx.store.raw_path(image.uuid), "raw", export["portal"],
                               export["iqn"], int(export.get("lun", 1)), target_is_zero=False,
                               progress_callback=progress)
    except Exception as error:
        raise DeployError(f"writing over iSCSI failed: {error}") from None
    finally:
        try:
            run_agent_command(work, "unexport_iscsi", {"iqn": iqn}, "unexport disk")
        except DeployError as error:
            LOG.warning("node %s: %s", work.node.uuid, error)


def _reboot_into(work: NodeWork, device: str) -> str:
    """Boot from `device` next; reboot out of band, or in-band through the agent (WoL)."""
    power = work.driver.power
    power.set_boot_device(work.target, device)
    if power.assumed_state:
        run_agent_command(work, "reboot", {}, "reboot", wait=False)
        return states.POWER_ON
    return power.set_power_state(work.target, states.REBOOTING)


def _power_off(work: NodeWork) -> str:
    power = work.driver.power
    if power.assumed_state:
        run_agent_command(work, "power_off", {}, "power off", wait=False)
        return states.POWER_OFF
    return power.set_power_state(work.target, states.POWER_OFF)


_DONE_WITH_AGENT = {"agent_url": None, "agent_token": None, "agent_token_given": False,
                    "agent_address": None, "agent_alarm": None,
                    "deploy_step": {}, "target_provision_state": None, "last_error": None}


def continue_deploy(work: NodeWork) -> Outcome:
    try:
        image = _instance_image(work)
        written = ""
        if work.node.deploy_interface == "iscsi":
            _write_iscsi(work, image)
        else:
            written = _chunks_written(_write_direct(work, image), work.node.instance_info or {})
        # The network stays first, as on a room PC: the seat's script (now "the local disk")
        # sends it to its disk, and a later deploy, inspection or session needs no change
        # of its boot order. Under Secure Boot the firmware checks the disk's loader itself.
        power_state = _reboot_into(work, "pxe")
    except (DeployError, PowerError, InvalidDriverInfo) as error:
        return _failure(work, f"Deploy failed: {error}")
    return Outcome({**_DONE_WITH_AGENT, "provision_state": states.ACTIVE,
                    "power_state": power_state},
                   [("deployment", "INFO", f"image {image.name} written and verified "
                                           f"({image.raw_sha256[:12]}{written}); booting it"),
                    ("provisioning", "INFO", "deploying -> active")])


def continue_clean(work: NodeWork) -> Outcome:
    try:
        run_agent_command(work, "wipe_metadata", {}, "erase disk metadata")
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
                   [("inspection", "INFO", f"inventory stored: {_summary(properties)}"
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
    iqn = f"iqn.2026-11.org.labmetal:{work.node.uuid}"
    incoming = ctx.store.root / ".incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    disk = incoming / f"capture-{work.node.uuid}.raw"
    try:
        export = run_agent_command(work, "export_iscsi", {"iqn": iqn}, "export disk over iSCSI")
        try:
            def progress(done: int, total: int) -> None:
                ctx.save_step(work.node.id, {**(work.node.deploy_step or {}),
                                             "step": "read disk over iSCSI", "done": done,
                                             "total": total})
            capture_over_iscsi(export["portal"], export["iqn"], int(export.get("lun", 1)), disk,
                               progress_callback=progress)
        finally:
            run_agent_command(work, "unexport_iscsi", {"iqn": iqn}, "unexport disk")
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
                                        f"{stored.raw_sha256[:12]})"),
                    ("provisioning", "INFO", "capturing -> manageable")])


def _without_capture(work: NodeWork) -> dict[str, Any]:
    return {k: v for k, v in work.driver_internal_info.items() if k != "capture_image"}


def _capture_failed(work: NodeWork, message: str) -> Outcome:
    """Back to manageable; the queued image is removed so its name can be used again."""
    image_uuid = work.driver_internal_info.get("capture_image")
    with work.ctx.db.write() as session:
        image = session.scalar(select(Image).where(Image.uuid == image_uuid,
                                                   Image.status == "queued"))
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
