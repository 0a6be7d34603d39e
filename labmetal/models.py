"""The storage of record. Every change of a node's state is a row update here first."""
from __future__ import annotations

import uuid as uuidlib
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (JSON, BigInteger, Boolean, DateTime, ForeignKey, String, Text,
                        UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from labmetal.lifecycles import IMAGE, ROOM_JOB, ROOM_JOB_SEAT, SESSION


def utcnow() -> datetime:
    """Naive UTC: SQLite keeps no time zone, so every timestamp is UTC by convention."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def new_uuid() -> str:
    return str(uuidlib.uuid4())


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, datetime: DateTime()}


class Node(Base):
    __tablename__ = "nodes"

    id: Mapped[int] = mapped_column(primary_key=True)
    uuid: Mapped[str] = mapped_column(String(36), unique=True, default=new_uuid)
    name: Mapped[str | None] = mapped_column(String(255), unique=True)
    driver: Mapped[str] = mapped_column(String(64))
    # Secrets inside are sealed (see labmetal.secrets); the API shows them masked.
    driver_info: Mapped[dict[str, Any]] = mapped_column(default=dict)
    driver_internal_info: Mapped[dict[str, Any]] = mapped_column(default=dict)
    properties: Mapped[dict[str, Any]] = mapped_column(default=dict)
    extra: Mapped[dict[str, Any]] = mapped_column(default=dict)
    instance_info: Mapped[dict[str, Any]] = mapped_column(default=dict)
    instance_uuid: Mapped[str | None] = mapped_column(String(36))
    description: Mapped[str | None] = mapped_column(Text)
    resource_class: Mapped[str | None] = mapped_column(String(80))
    power_state: Mapped[str | None] = mapped_column(String(16))
    target_power_state: Mapped[str | None] = mapped_column(String(16))
    provision_state: Mapped[str] = mapped_column(String(16), default="enroll", index=True)
    target_provision_state: Mapped[str | None] = mapped_column(String(16))
    provision_updated_at: Mapped[datetime | None]
    deploy_interface: Mapped[str] = mapped_column(String(16), default="direct",
                                                  server_default="direct")
    # The step the conductor is in and its progress ({"step", "done", "total"}), as shown
    # per seat while a deploy or clean runs (Ironic's deploy_step).
    deploy_step: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default="{}")
    # The deploy agent booted on the node: where it listens, its token (sealed; given to
    # the agent once per deploy and required on every later call), its last heartbeat.
    agent_url: Mapped[str | None] = mapped_column(String(255))
    agent_token: Mapped[str | None] = mapped_column(Text)
    agent_token_given: Mapped[bool] = mapped_column(Boolean, default=False,
                                                    server_default="0")
    agent_heartbeat_at: Mapped[datetime | None]
    # The seat address the agent token is bound to: its DHCP lease's, or the first
    # lookup's where labmetal hands out no leases. Calls from elsewhere are refused.
    agent_address: Mapped[str | None] = mapped_column(String(45))
    # Why this deploy's agent is no longer believed (a second lookup of its token): the
    # conductor fails the deploy rather than call it verified.
    agent_alarm: Mapped[str | None] = mapped_column(Text)
    inventory: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default="{}")
    # The intent the reserving conductor must carry out ("power on", "verify", ...).
    # Written with the reservation in one statement, so a dead process loses nothing.
    pending_action: Mapped[str | None] = mapped_column(String(32))
    last_error: Mapped[str | None] = mapped_column(Text)
    maintenance: Mapped[bool] = mapped_column(Boolean, default=False)
    maintenance_reason: Mapped[str | None] = mapped_column(Text)
    fault: Mapped[str | None] = mapped_column(String(64))
    # The node lock: the hostname of the conductor acting on the node, set by compare-and-set.
    reservation: Mapped[str | None] = mapped_column(String(255), index=True)
    conductor_affinity: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime | None] = mapped_column(onupdate=utcnow)

    ports: Mapped[list[Port]] = relationship(back_populates="node", passive_deletes=True,
                                             order_by="Port.id")


class Port(Base):
    __tablename__ = "ports"

    id: Mapped[int] = mapped_column(primary_key=True)
    uuid: Mapped[str] = mapped_column(String(36), unique=True, default=new_uuid)
    address: Mapped[str] = mapped_column(String(18), unique=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"), index=True)
    pxe_enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    extra: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime | None] = mapped_column(onupdate=utcnow)

    node: Mapped[Node] = relationship(back_populates="ports")


class Conductor(Base):
    __tablename__ = "conductors"

    id: Mapped[int] = mapped_column(primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255), unique=True)
    online: Mapped[bool] = mapped_column(Boolean, default=True)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)
    wake_url: Mapped[str | None] = mapped_column(String(255))
    drivers: Mapped[dict[str, Any]] = mapped_column(default=dict)  # {"names": [...]}
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime | None] = mapped_column(onupdate=utcnow)


class DhcpLease(Base):
    """An address the room's DHCP server (labmetal's dnsmasq) leased to a MAC, as the
    conductor running it last read its lease file: what binds a seat's secrets to the seat
    (DESIGN §11). A MAC may hold several (the PXE ROM, iPXE and the ramdisk may each ask
    with their own client id)."""
    __tablename__ = "dhcp_leases"

    mac: Mapped[str] = mapped_column(String(17), primary_key=True)
    address: Mapped[str] = mapped_column(String(45), primary_key=True)
    expires_at: Mapped[datetime | None]
    conductor: Mapped[str] = mapped_column(String(255))


class NodeHistory(Base):
    """Every state change and error of a node, with time (Ironic's node history)."""
    __tablename__ = "node_history"

    id: Mapped[int] = mapped_column(primary_key=True)
    uuid: Mapped[str] = mapped_column(String(36), unique=True, default=new_uuid)
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    event_type: Mapped[str] = mapped_column(String(32))
    severity: Mapped[str] = mapped_column(String(16), default="INFO")
    event: Mapped[str] = mapped_column(Text)
    conductor: Mapped[str | None] = mapped_column(String(255))
    user: Mapped[str | None] = mapped_column(String(255))


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    # bcrypt; None for accounts checked by LDAP (source "ldap").
    password_hash: Mapped[str | None] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16), default="admin")
    source: Mapped[str] = mapped_column(String(16), default="local", server_default="local")
    disabled: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_login_at: Mapped[datetime | None]


class AuthToken(Base):
    """An API token (kind "api") or a web login session (kind "web"). Only the hash of the
    secret is kept: the secret is shown once, to whoever asked for it."""
    __tablename__ = "auth_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    uuid: Mapped[str] = mapped_column(String(36), unique=True, default=new_uuid)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(8))
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex
    description: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]


class Image(Base):
    """An image in the store. Disk images are kept as a sparse raw file plus the packed
    chunks and manifest (agent/manifest.py); kernels and ramdisks as the file itself."""
    __tablename__ = "images"

    id: Mapped[int] = mapped_column(primary_key=True)
    uuid: Mapped[str] = mapped_column(String(36), unique=True, default=new_uuid)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    # whole-disk | partition | kernel | ramdisk (deploy kernels and ramdisks are kernels
    # and ramdisks too; the node's driver_info says which ones it boots)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default=IMAGE.initial)  # queued | active
    disk_format: Mapped[str | None] = mapped_column(String(16))  # as uploaded: raw | qcow2
    size: Mapped[int | None] = mapped_column(BigInteger)  # bytes uploaded
    sha256: Mapped[str | None] = mapped_column(String(64))  # of the upload
    virtual_size: Mapped[int | None] = mapped_column(BigInteger)
    raw_sha256: Mapped[str | None] = mapped_column(String(64))
    chunk_size: Mapped[int | None]
    chunk_count: Mapped[int | None]
    packed_size: Mapped[int | None] = mapped_column(BigInteger)
    kernel_id: Mapped[int | None] = mapped_column(ForeignKey("images.id", ondelete="RESTRICT"))
    ramdisk_id: Mapped[int | None] = mapped_column(ForeignKey("images.id", ondelete="RESTRICT"))
    description: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime | None] = mapped_column(onupdate=utcnow)


class Room(Base):
    """A teaching room: the seats (nodes) a teacher acts on together."""
    __tablename__ = "rooms"

    id: Mapped[int] = mapped_column(primary_key=True)
    uuid: Mapped[str] = mapped_column(String(36), unique=True, default=new_uuid)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str | None] = mapped_column(Text)
    # The TP the room is open for: its seats' login offers that template's session alone.
    tp_template_id: Mapped[int | None] = mapped_column(ForeignKey("templates.id",
                                                                  ondelete="SET NULL"))
    tp_started_by: Mapped[str | None] = mapped_column(String(255))
    tp_started_at: Mapped[datetime | None]
    tp_template: Mapped[Template | None] = relationship(lazy="joined")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime | None] = mapped_column(onupdate=utcnow)


class Seat(Base):
    """A node's place in a room (label such as A07). A node sits in one room at most."""
    __tablename__ = "seats"
    __table_args__ = (UniqueConstraint("room_id", "label"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    room_id: Mapped[int] = mapped_column(ForeignKey("rooms.id", ondelete="CASCADE"), index=True)
    label: Mapped[str] = mapped_column(String(32))
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"), unique=True)


class RoomJob(Base):
    """"Image X on room Y, now or at 08:00 (every week)", or "power room Y off at 18:00".
    The job and its per-seat rows are the whole truth: any process may die, the conductor
    that owns the job next reads them and carries on."""
    __tablename__ = "room_jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    uuid: Mapped[str] = mapped_column(String(36), unique=True, default=new_uuid)
    room_id: Mapped[int] = mapped_column(ForeignKey("rooms.id", ondelete="CASCADE"), index=True)
    action: Mapped[str] = mapped_column(String(16))  # deploy | power-off | cache
    image_id: Mapped[int | None] = mapped_column(ForeignKey("images.id", ondelete="SET NULL"))
    image_name: Mapped[str | None] = mapped_column(String(255))  # kept if the image goes
    # cache: the TP's template version put in the seats' caches (its image is image_id)
    template_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("template_versions.id", ondelete="SET NULL"))
    # scheduled -> running -> done | failed (some seats failed after their retries) | cancelled
    state: Mapped[str] = mapped_column(String(16), default=ROOM_JOB.initial, index=True)
    transport: Mapped[str] = mapped_column(String(16), default="auto")  # as requested
    chosen_transport: Mapped[str | None] = mapped_column(String(16))  # unicast | multicast
    multicast: Mapped[dict[str, Any]] = mapped_column(default=dict)  # group, port, sender
    retries: Mapped[int] = mapped_column(default=2)
    scheduled_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    repeat: Mapped[str | None] = mapped_column(String(16))  # daily | weekly
    owner: Mapped[str | None] = mapped_column(String(255))  # the conductor running it
    created_by: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)

    seats: Mapped[list[RoomJobSeat]] = relationship(passive_deletes=True,
                                                    order_by="RoomJobSeat.label")


class RoomJobSeat(Base):
    """One seat of a room job, with the state a teacher sees on the seat's tile."""
    __tablename__ = "room_job_seats"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("room_jobs.id", ondelete="CASCADE"),
                                        index=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"))
    label: Mapped[str] = mapped_column(String(32))
    # queued | powering | booting | writing | verifying | done | failed | cancelled
    state: Mapped[str] = mapped_column(String(16), default=ROOM_JOB_SEAT.initial)
    progress: Mapped[int] = mapped_column(default=0)  # percent
    attempts: Mapped[int] = mapped_column(default=0)
    error: Mapped[str | None] = mapped_column(Text)
    requested_at: Mapped[datetime | None]  # the current attempt's request to the node
    updated_at: Mapped[datetime | None] = mapped_column(default=utcnow, onupdate=utcnow)

    job: Mapped[RoomJob] = relationship(viewonly=True)


class Template(Base):
    """A teacher's TP template: a name for a series of frozen versions of a disk image.
    A new version never changes the sessions made from an older one."""
    __tablename__ = "templates"

    id: Mapped[int] = mapped_column(primary_key=True)
    uuid: Mapped[str] = mapped_column(String(36), unique=True, default=new_uuid)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    description: Mapped[str | None] = mapped_column(Text)
    owner: Mapped[str | None] = mapped_column(String(255))  # the teacher who made it
    # How its sessions run (issue 16): "local" from the seat's disk (the template's own
    # kernel and labmetal's session initramfs), "iscsi" diskless over iSCSI, "auto": local
    # where the version can boot that way, else iSCSI.
    session_mode: Mapped[str] = mapped_column(String(8), default="auto")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime | None] = mapped_column(onupdate=utcnow)

    versions: Mapped[list[TemplateVersion]] = relationship(
        back_populates="template", cascade="all, delete-orphan", passive_deletes=True,
        order_by="TemplateVersion.version")


class TemplateVersion(Base):
    """Version n of a template: the image it was frozen from and where the storage backend
    keeps the frozen copy (``backend``, ``backend_key`` with ``version``)."""
    __tablename__ = "template_versions"
    __table_args__ = (UniqueConstraint("template_id", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    template_id: Mapped[int] = mapped_column(ForeignKey("templates.id", ondelete="CASCADE"),
                                             index=True)
    version: Mapped[int]
    image_id: Mapped[int | None] = mapped_column(ForeignKey("images.id", ondelete="SET NULL"))
    image_name: Mapped[str | None] = mapped_column(String(255))  # kept if the image goes
    backend: Mapped[str] = mapped_column(String(16))  # local | ceph
    backend_key: Mapped[str] = mapped_column(String(63))  # the backend's template name
    size: Mapped[int] = mapped_column(BigInteger)  # virtual size, bytes
    description: Mapped[str | None] = mapped_column(Text)
    created_by: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Its own kernel and initrd (image UUIDs) and root filesystem: how a Secure Boot seat
    # boots a session of it, where iPXE cannot sanboot (images/boot_files.py). None: the
    # image has none (ext root with /boot/vmlinuz-*), so it boots diskless under iPXE only.
    boot_kernel: Mapped[str | None] = mapped_column(String(36))
    boot_initrd: Mapped[str | None] = mapped_column(String(36))
    boot_root_uuid: Mapped[str | None] = mapped_column(String(36))
    # How a seat boots a local session of it (images/session_initramfs.py): its kernel and
    # labmetal's session initramfs made for it (image UUIDs), where its root filesystem
    # lies in the image, and the raw image's sha256 (what a seat's cache must hold). None:
    # it cannot boot as a local session (no kernel, modules or dm_snapshot found).
    session_kernel: Mapped[str | None] = mapped_column(String(36))
    session_initramfs: Mapped[str | None] = mapped_column(String(36))
    root_offset: Mapped[int | None] = mapped_column(BigInteger)
    root_size: Mapped[int | None] = mapped_column(BigInteger)
    root_fstype: Mapped[str | None] = mapped_column(String(16))
    local_boot_error: Mapped[str | None] = mapped_column(Text)  # why it cannot, if not

    template: Mapped[Template] = relationship(back_populates="versions")


class StudentSession(Base):
    """A student's session of a TP template version: their own copy-on-write disk, which
    a seat boots over iSCSI. ``running`` means exported to ``seat_node_id`` by the API
    process's storage backend; one seat at a time."""
    __tablename__ = "student_sessions"

    id: Mapped[int] = mapped_column(primary_key=True)
    uuid: Mapped[str] = mapped_column(String(36), unique=True, default=new_uuid)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"),
                                         index=True)
    template_version_id: Mapped[int] = mapped_column(
        ForeignKey("template_versions.id", ondelete="RESTRICT"), index=True)
    backend: Mapped[str] = mapped_column(String(16))  # local | ceph
    # stopped | starting | running | syncing | failed | deleted
    state: Mapped[str] = mapped_column(String(16), default=SESSION.initial, index=True)
    # iscsi: the seat boots it diskless; local: from the seat's cache (SeatCache), synced
    # to the store at its end. Chosen at each start (the template's session_mode).
    mode: Mapped[str] = mapped_column(String(8), default="iscsi")
    synced_at: Mapped[datetime | None]  # the last verified upload from a seat
    # A save point asked for while the newest state is on the seat's disk: made as soon
    # as the seat's upload of it is verified (its label).
    pending_save: Mapped[str | None] = mapped_column(String(64))
    pending_save_by: Mapped[str | None] = mapped_column(String(255))  # who asked for it
    seat_node_id: Mapped[int | None] = mapped_column(ForeignKey("nodes.id",
                                                                ondelete="SET NULL"))
    target_iqn: Mapped[str | None] = mapped_column(String(223))
    target_portal: Mapped[str | None] = mapped_column(String(64))
    # One-way CHAP for the seat's initiator; the secret is sealed (labmetal.secrets) and
    # never returned by the API or logged.
    chap_user: Mapped[str] = mapped_column(String(64))
    chap_secret: Mapped[str] = mapped_column(Text)
    # The address the running session's boot script (with its CHAP secret) was given to:
    # the seat's DHCP lease, or the first to ask where labmetal leases nothing.
    seat_address: Mapped[str | None] = mapped_column(String(45))
    used_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    last_saved_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    created_by: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime | None] = mapped_column(onupdate=utcnow)

    user: Mapped[User] = relationship()
    template_version: Mapped[TemplateVersion] = relationship()
    seat: Mapped[Node | None] = relationship()
    saves: Mapped[list[SessionSave]] = relationship(cascade="all, delete-orphan",
                                                    passive_deletes=True,
                                                    order_by="SessionSave.number")


class SessionSave(Base):
    """A save point of a session (the backend's snapshot ``backend_save_id``)."""
    __tablename__ = "session_saves"

    id: Mapped[int] = mapped_column(primary_key=True)
    uuid: Mapped[str] = mapped_column(String(36), unique=True, default=new_uuid)
    session_id: Mapped[int] = mapped_column(ForeignKey("student_sessions.id",
                                                       ondelete="CASCADE"), index=True)
    number: Mapped[int]
    label: Mapped[str] = mapped_column(String(64))
    backend_save_id: Mapped[str] = mapped_column(String(128))
    created_by: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class SeatCache(Base):
    """What labmetal knows of a seat's cache region (agent/seat_cache.py): where it is, the
    template version its origin slot holds, and the session whose overlay is in it, with
    whether its upload was verified (False: the seat holds the only copy of its end).
    The seat's session ramdisk gets a token here, like the deploy agent's: handed out once
    per boot, bound to the seat's address, never shown by the API."""
    __tablename__ = "seat_caches"

    id: Mapped[int] = mapped_column(primary_key=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"),
                                         unique=True)
    cache_id: Mapped[str | None] = mapped_column(String(32))
    start: Mapped[int | None] = mapped_column(BigInteger)  # bytes from the disk's start
    size: Mapped[int | None] = mapped_column(BigInteger)
    origin_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("template_versions.id", ondelete="SET NULL"))
    origin_sha256: Mapped[str | None] = mapped_column(String(64))
    origin_complete: Mapped[bool] = mapped_column(Boolean, default=False)
    overlay_session_id: Mapped[int | None] = mapped_column(
        ForeignKey("student_sessions.id", ondelete="SET NULL"))
    overlay_uploaded: Mapped[bool] = mapped_column(Boolean, default=True)
    chunk_sectors: Mapped[int | None]
    token: Mapped[str | None] = mapped_column(Text)  # sealed
    token_address: Mapped[str | None] = mapped_column(String(45))
    reported_at: Mapped[datetime | None]
    updated_at: Mapped[datetime | None] = mapped_column(onupdate=utcnow)
