"""How an image gets onto a node's disk: one small interface per way, picked by the node's
``deploy_interface`` field (Ironic's DeployInterface in ``drivers/base.py``), so that the
deploy flow (conductor/deploy.py) asks the node's interface and never branches on its name.
A new way is a new class in DEPLOY_INTERFACES, not a new ``if`` in the flow.

``direct`` (the default): the agent writes the image itself, through its one write
pipeline (agent/writer.py), then the conductor checks the sha256 the agent read back and
asks for a receipt over random extents of the disk (agent/proof.py).

Where the agent gets the chunks from is the direct interface's *chunk source*, not an
interface of its own: HTTP from the image store, or, when a room job chose multicast for
its run, the job's group (``instance_info["multicast"]``, an agent MulticastGroup). The
commands, the checks and the outcome are the same either way, only where the bytes come
from differs; and the choice is the room job's, for one run, where ``deploy_interface`` is
the node's, for every deploy (a seat redeployed by hand after the job must not look for
its group). Delta is not a source either: it is the pipeline's first stage on the seat (the
disk keeps the chunks it already holds, whatever the source) and needs nothing here.

``iscsi``: the agent exports its disk and the conductor writes the image into it with
qemu-img (conductor/iscsi_writer.py); whole-disk images only.
"""
from __future__ import annotations

import abc
import hmac
import logging
import os
from typing import TYPE_CHECKING, Any, ClassVar

from labmetal.agent import proof
from labmetal.agent.command_params import (DeployPartitionImage, ExportIscsi,
                                           InstallBootloader, MulticastGroup, ParamsError,
                                           ProveDisk, UnexportIscsi, WriteImage)
from labmetal.conductor.agent_steps import DeployError, run_agent_command
from labmetal.models import Image, Node
from labmetal.names import seat_iqn

if TYPE_CHECKING:
    from labmetal.conductor.actions import NodeWork

LOG = logging.getLogger(__name__)


class DeployInterface(abc.ABC):
    """Writes an image onto a node's disk, through the agent the node booted."""
    name: ClassVar[str]

    @abc.abstractmethod
    def validate(self, work: NodeWork, image: Image) -> None:
        """Refuse (DeployError), before anything is written, an image this interface
        cannot deploy."""

    @abc.abstractmethod
    def write_image(self, work: NodeWork, image: Image) -> str:
        """Write ``image`` onto the node's disk and verify it; raise DeployError if either
        fails. Returns what the history adds to "image X written and verified (sha256"."""


def for_node(node: Node) -> DeployInterface:
    name = node.deploy_interface or "direct"
    interface = DEPLOY_INTERFACES.get(name)
    if interface is None:
        raise DeployError(f"unknown deploy_interface {name!r}; known: "
                          f"{', '.join(DEPLOY_INTERFACES)}")
    return interface


class DirectDeploy(DeployInterface):
    name = "direct"

    def validate(self, work: NodeWork, image: Image) -> None:
        if image.kind != "whole-disk":
            self._kernel_and_ramdisk(work, image)
        chunk_source(work.node.instance_info or {})

    @staticmethod
    def _kernel_and_ramdisk(work: NodeWork, image: Image) -> tuple[Image, Image]:
        kernel = work.ctx.image_by_id(image.kernel_id)
        ramdisk = work.ctx.image_by_id(image.ramdisk_id)
        if kernel is None or ramdisk is None:
            raise DeployError(f"partition image {image.name} lost its kernel or ramdisk")
        return kernel, ramdisk

    def write_image(self, work: NodeWork, image: Image) -> str:
        ctx = work.ctx
        info = work.node.instance_info or {}
        group = chunk_source(info)
        common: dict[str, Any] = dict(
            manifest_url=ctx.manifest_url(image), packed_url=ctx.file_url(image, "packed"),
            multicast=group, readback=bool(info.get("verify_readback")))
        if image.kind == "whole-disk":
            result = run_agent_command(work, WriteImage(**common), "write image")
            _check_written(work, image, result)
            return _chunks_written(result, group)
        kernel, ramdisk = self._kernel_and_ramdisk(work, image)
        # auto: as the PC booted the ramdisk (BIOS or UEFI)
        params = DeployPartitionImage(**common, boot_mode=info.get("boot_mode", "auto"))
        result = run_agent_command(work, params, "write image")
        _check_written(work, image, result)  # before the boot loader changes the file system
        run_agent_command(work, InstallBootloader(
            kernel_url=ctx.file_url(kernel, "file"), ramdisk_url=ctx.file_url(ramdisk, "file"),
            kernel_cmdline=info.get("kernel_append_params", "console=ttyS0")),
            "install the boot loader")
        return _chunks_written(result, group)


def chunk_source(info: dict[str, Any]) -> MulticastGroup | None:
    """The room job's multicast group this seat receives from, or None: HTTP."""
    if not info.get("multicast"):
        return None
    try:
        return MulticastGroup.from_dict(info["multicast"], "instance_info.multicast")
    except ParamsError as error:
        raise DeployError(str(error)) from None


def _check_written(work: NodeWork, image: Image, result: dict[str, Any]) -> None:
    if result.get("raw_sha256") != image.raw_sha256:
        raise DeployError("the agent's sha256 of what it wrote is not the image's "
                          f"({(image.raw_sha256 or '')[:12]})")
    _check_receipt(work, image)


def _check_receipt(work: NodeWork, image: Image) -> None:
    """The disk holds the image: a fresh challenge over random extents, answered from the
    disk, checked against the store's copy (agent/proof.py). The sha256 above is public;
    this answer cannot be made without the bytes."""
    raw = str(work.ctx.store.raw_path(image.uuid))
    challenge = proof.challenge(os.path.getsize(raw))
    answer = run_agent_command(work, ProveDisk(challenge), "prove the write",
                               key=f":{challenge.nonce[:16]}")
    expected = proof.digest(raw, 0, challenge)
    given = answer.get("hmac")
    if not (isinstance(given, str) and hmac.compare_digest(given, expected)):
        raise DeployError("the disk's answer to the receipt challenge does not match the "
                          "image: the write cannot be verified")


def _chunks_written(result: dict[str, Any], group: MulticastGroup | None) -> str:
    """"; 3 of 64 chunks written" for the history: a delta re-image shows what it spared."""
    try:
        written, total = int(result.get("chunks_written") or 0), int(result["chunks_total"])
    except (KeyError, TypeError, ValueError):
        return ""
    source = " from multicast" if group is not None else ""
    return f"; {written} of {total} chunks written{source}"


class IscsiDeploy(DeployInterface):
    """The agent exports its disk; the conductor writes the image into it with qemu-img."""
    name = "iscsi"

    def validate(self, work: NodeWork, image: Image) -> None:
        if image.kind != "whole-disk":
            raise DeployError("the iscsi deploy interface writes whole-disk images; use "
                              "deploy_interface direct for partition images")

    def write_image(self, work: NodeWork, image: Image) -> str:
        from labmetal.conductor.iscsi_writer import write_image_over_iscsi
        iqn = seat_iqn(work.node.uuid)
        export = run_agent_command(work, ExportIscsi(iqn=iqn), "export disk over iSCSI")
        try:
            def progress(done: int, total: int) -> None:
                work.ctx.save_step(work.node.id, {**(work.node.deploy_step or {}),
                                                  "step": "write image over iSCSI",
                                                  "done": done, "total": total})
            write_image_over_iscsi(work.ctx.store.raw_path(image.uuid), "raw",
                                   export["portal"], export["iqn"], int(export.get("lun", 1)),
                                   target_is_zero=False, progress_callback=progress)
        except Exception as error:
            raise DeployError(f"writing over iSCSI failed: {error}") from None
        finally:
            try:
                run_agent_command(work, UnexportIscsi(iqn=iqn), "unexport disk")
            except DeployError as error:
                LOG.warning("node %s: %s", work.node.uuid, error)
        return ""


DEPLOY_INTERFACES: dict[str, DeployInterface] = {
    interface.name: interface for interface in (DirectDeploy(), IscsiDeploy())}
