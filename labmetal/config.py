"""Settings for every labmetal process: command line > environment > config file > defaults.

Environment variables are the setting's name in upper case with a ``LABMETAL_`` prefix
(``LABMETAL_DATABASE``); the config file is TOML with the same names under ``[labmetal]``.

One flat record is loaded (``Settings``: the names users write, ``Settings(auth=...)`` in
code); each part receives only its group, a frozen record built from it by one property
(``settings.power`` for the IPMI driver, ``settings.boot`` for the PXE side, ...). Groups are
chosen by who reads them, not by the names' prefixes. Every setting has exactly one home
group (tests/test_settings_and_storage.py checks it, so a new setting must be placed); a
group may also *borrow* a value another group owns that its reader needs too (the state
directory, the seat URL): those fields are marked ``BORROWED``. A default that depends on
another setting (an empty ``image_dir`` is ``state_dir/images``) is resolved by the group
that uses it. Only the modules that assemble many parts (labmetal/service.py,
conductor/service.py, api/services.py) and the API views hold the whole record.
"""
from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import logging
import os
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, TypeVar
from urllib.parse import urlsplit

from labmetal.rundir import default_run_root

LOG = logging.getLogger(__name__)


DEFAULT_TLS_PORT = 6443  # the HTTPS listener's port when tls_listen names none


def default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/labmetal")
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local/share")) / "labmetal"


# A group's field that another group owns: a value its reader needs too.
BORROWED = MappingProxyType({"borrowed": True})


@dataclass(frozen=True)
class ServiceSettings:
    """The process itself (labmetal/service.py, the CLI): its state, database, key, logs."""
    state_dir: Path
    database: str
    secret_key_file: Path | None
    hostname: str
    log_file: Path | None
    log_level: str

    @property
    def database_url(self) -> str:
        return self.database or f"sqlite:///{self.state_dir / 'labmetal.db'}"

    @property
    def secret_key_path(self) -> Path:
        return self.secret_key_file or self.state_dir / "secret.key"


@dataclass(frozen=True)
class FrontSettings:
    """What faces the network and the addresses labmetal is reached at (labmetal/front.py,
    the HTTP server in labmetal/service.py)."""
    listen: str
    front: str
    tls_listen: str
    tls_cert: Path | None
    tls_key: Path | None
    client_timeout: float
    public_url: str
    seat_url: str
    state_dir: Path = field(metadata=BORROWED)
    max_image_size: int = field(metadata=BORROWED)

    @property
    def listen_host_port(self) -> tuple[str, int]:
        return split_host_port(self.listen)

    @property
    def tls_listen_host_port(self) -> tuple[str, int]:
        """The front's HTTPS listener: ``tls_listen``, a bare port meaning listen's host."""
        host, _ = self.listen_host_port
        if not self.tls_listen:
            return host, DEFAULT_TLS_PORT
        if self.tls_listen.isdigit():
            return host, int(self.tls_listen)
        return split_host_port(self.tls_listen)

    @property
    def seat_base_url(self) -> str:
        if self.seat_url or self.public_url:
            return (self.seat_url or self.public_url).rstrip("/")
        host, port = self.listen_host_port
        return f"http://{host}:{port}"

    @property
    def seat_https_url(self) -> str | None:
        """Where seats reach the front's HTTPS listener (the seat login of labmetal's
        ramdisk sends passwords there): its address, or the seat URL's host if it listens
        on every address. None without the front: then nothing may ask a seat for a
        password."""
        if self.front == "none":
            return None
        host, port = self.tls_listen_host_port
        if host in ("", "0.0.0.0", "::"):  # every address: the one seats reach labmetal at
            host = urlsplit(self.seat_base_url).hostname or "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
        return f"https://{host}:{port}"

    @property
    def tls_dir(self) -> Path:
        """labmetal's CA and the front's server certificate (labmetal/tls.py)."""
        return self.state_dir / "tls"


@dataclass(frozen=True)
class AccessSettings:
    """Who may call the API, and how long a login or token lasts (the API's
    authentication and login views, the start-up check in labmetal/service.py)."""
    auth: str
    allow_noauth: bool
    policy_file: Path | None
    token_lifetime: float
    session_idle_timeout: float


@dataclass(frozen=True)
class DirectorySettings:
    """The LDAP directory accounts may come from (labmetal/directory.py)."""
    ldap_url: str
    ldap_user_dn_template: str
    ldap_role_attribute: str
    ldap_role_map: str
    ldap_default_role: str
    ldap_timeout: float


@dataclass(frozen=True)
class ConductorSettings:
    """The conductor's loops, pools and waits (conductor/service.py), and how its
    clients retry a busy node's lock (conductor/rpcapi.py)."""
    wake_listen: str
    heartbeat_interval: float
    conductor_dead_after: float
    scan_interval: float
    power_sync_interval: float
    power_sync_workers: int
    power_sync_max_failures: int
    action_workers: int
    lock_retries: int
    lock_retry_interval: float
    callback_timeout: float
    missed_boot_after: float
    room_job_interval: float


@dataclass(frozen=True)
class PowerSettings:
    """The IPMI power driver's time limits (conductor/drivers.py)."""
    ipmi_deadline: float
    ipmi_packet_timeout: float


@dataclass(frozen=True)
class DeploySettings:
    """What a deploy boots and how long it waits for the agent (conductor/deploy.py,
    conductor/agent_steps.py, and the door's checks, conductor/door.py)."""
    deploy_kernel: str
    deploy_ramdisk: str
    automated_clean: bool
    agent_timeout: float
    seat_base_url: str = field(metadata=BORROWED)


@dataclass(frozen=True)
class ImageSettings:
    """The image store (images/store.py, made by labmetal/service.py and api/images.py)."""
    image_dir: Path | None
    max_image_size: int
    state_dir: Path = field(metadata=BORROWED)

    @property
    def image_path(self) -> Path:
        return self.image_dir or self.state_dir / "images"


@dataclass(frozen=True)
class BootSettings:
    """The PXE side: TFTP, the room's DHCP, a UEFI PC's first file, enrolling unknown
    seats, the seat's menu (conductor/bootserver.py, api/seat_address.py)."""
    tftp_listen: str
    dhcp_interface: str
    dhcp_network: str
    dhcp_pool: str
    dhcp_mode: str
    dhcp_namespace: str
    uefi_loader: str
    self_registration: bool
    discovery_driver: str
    seat_menu_timeout: int
    seat_language: str
    state_dir: Path = field(metadata=BORROWED)
    hostname: str = field(metadata=BORROWED)
    seat_base_url: str = field(metadata=BORROWED)

    @property
    def tftp_root(self) -> Path:
        return self.state_dir / "tftp"

    @property
    def dhcp_dir(self) -> Path:
        """dnsmasq's config, hosts, leases and log."""
        return self.state_dir / "dhcp"


@dataclass(frozen=True)
class RoomJobSettings:
    """Room jobs: their schedule's time zone and the multicast they deploy with
    (conductor/roomjobs.py)."""
    timezone: str
    multicast_min_seats: int
    multicast_groups: str
    multicast_port: int
    multicast_rate: int
    multicast_ttl: int
    seat_base_url: str = field(metadata=BORROWED)
    # how long a seat of a room opening a TP has to come for the template (its cache)
    callback_timeout: float = field(metadata=BORROWED, default=1800.0)


@dataclass(frozen=True)
class SessionStoreSettings:
    """Where students' sessions keep their disks and the iSCSI portal seats boot them
    from (the session store, conductor/session_store.py, over images/overlays/)."""
    overlay_backend: str
    overlay_dir: Path | None
    overlay_run_dir: Path | None
    ceph_conf: Path
    ceph_pool: str
    ceph_client: str
    ceph_timeout: float
    ceph_bulk_timeout: float
    ceph_object_order: int
    iscsi_portal: str
    session_quota_mib: int
    class_quota_mib: int
    session_disconnect_end: float
    seat_cache_mib: int
    session_chunk_kib: int
    state_dir: Path = field(metadata=BORROWED)
    seat_base_url: str = field(metadata=BORROWED)

    @property
    def overlay_path(self) -> Path:
        return self.overlay_dir or self.state_dir / "overlays"

    @property
    def overlay_run_path(self) -> Path:
        """Unix socket paths are limited to 107 bytes: the default is short and stable
        for a state directory, in a private run root (labmetal/rundir.py: whoever uses it
        makes or checks it with ``private_dir``, never trusting a directory found there)."""
        if self.overlay_run_dir:
            return self.overlay_run_dir
        digest = hashlib.sha256(str(self.overlay_path.resolve()).encode()).hexdigest()[:10]
        return default_run_root() / f"ov-{digest}"

    @property
    def iscsi_portal_host_port(self) -> tuple[str, int]:
        if self.iscsi_portal:
            return split_host_port(self.iscsi_portal)
        return urlsplit(self.seat_base_url).hostname or "127.0.0.1", 3260


G = TypeVar("G")


@dataclass
class Settings:
    listen: str = "127.0.0.1:6385"  # plain HTTP: seats (iPXE has no TLS), this machine
    # What faces the network (labmetal/front.py): nginx, with HTTPS on tls_listen, bodies
    # bounded per route, slow clients cut off; or none: waitress directly on listen, plain
    # HTTP only (for a machine of its own, not a lab network).
    front: str = "nginx"
    tls_listen: str = ""  # HOST:PORT, or PORT on listen's host; default listen's host:6443
    tls_cert: Path | None = None  # an operator's certificate (PEM, chain included) ...
    tls_key: Path | None = None  # ... and key; default: made by labmetal's own CA
    # Seconds a client may take to send its request's head, the next piece of its body,
    # or to take the next piece of the answer, before the front closes its connection.
    client_timeout: float = 15.0
    database: str = ""  # default: sqlite under state_dir
    auth: str = "http_basic"  # http_basic (labmetal's users: basic, tokens, web login) | noauth
    # noauth makes every caller an admin: the API refuses it on an address that is not
    # loopback unless this says so (--insecure-noauth): the seat network is hostile.
    allow_noauth: bool = False
    state_dir: Path = field(default_factory=default_state_dir)
    secret_key_file: Path | None = None  # default: state_dir/secret.key
    hostname: str = field(default_factory=socket.gethostname)
    public_url: str = ""  # base URL the API puts in links; default from the request
    wake_listen: str = "127.0.0.1:0"  # the conductor's wake-up endpoint
    log_file: Path | None = None
    log_level: str = "INFO"
    heartbeat_interval: float = 2.0
    conductor_dead_after: float = 10.0
    scan_interval: float = 1.0
    power_sync_interval: float = 60.0
    power_sync_workers: int = 32
    power_sync_max_failures: int = 3
    action_workers: int = 64
    ipmi_deadline: float = 15.0  # a whole IPMI call, every resend included
    ipmi_packet_timeout: float = 2.0  # the longest wait for one answer before resending
    lock_retries: int = 3
    lock_retry_interval: float = 0.3
    image_dir: Path | None = None  # default: state_dir/images
    max_image_size: int = 64 * 1024 ** 3  # bytes, for uploads and virtual sizes alike
    seat_url: str = ""  # base URL seats use for boot files, images and the agent API
    deploy_kernel: str = ""  # image name/UUID used when a node's driver_info names none
    deploy_ramdisk: str = ""
    automated_clean: bool = False  # provide: erase disk metadata through the agent first
    callback_timeout: float = 1800.0  # waiting for the agent to call back (Ironic's default)
    # A seat switched on before labmetal stopped (or lost its database) and still silent
    # this long after it is back is switched on again: its network boot found no one.
    missed_boot_after: float = 120.0
    agent_timeout: float = 60.0  # the agent not answering in the middle of a command
    self_registration: bool = False  # unknown MACs that PXE-boot are enrolled with inventory
    discovery_driver: str = "wol"  # the driver a self-registered node gets
    tftp_listen: str = ""  # HOST:PORT for the iPXE binaries PXE ROMs load; empty: no TFTP
    dhcp_interface: str = ""  # the room's interface for dnsmasq; empty: no DHCP
    dhcp_network: str = ""  # 10.99.1.0/24
    dhcp_pool: str = ""  # first,last address handed out (server mode)
    dhcp_mode: str = "server"  # server | proxy (the room already has a DHCP server)
    dhcp_namespace: str = ""  # run dnsmasq in this network namespace (the simulated lab)
    # A UEFI PC's first file: shim (Debian's signed shim -> GRUB: boots with Secure Boot on
    # or off) or ipxe (snponly.efi: faster HTTP loading, diskless sessions; Secure Boot off).
    # A node's driver_info/pxe_loader overrides it.
    uefi_loader: str = "shim"
    policy_file: Path | None = None  # JSON or TOML {action: [roles]} over the defaults
    token_lifetime: float = 7 * 86400.0  # API tokens (POST /v1/auth/tokens), seconds
    session_idle_timeout: float = 8 * 3600.0  # a web login ends after this long unused
    ldap_url: str = ""  # ldap://host[:port] or ldaps://...; empty: local accounts only
    ldap_user_dn_template: str = ""  # uid={user},ou=people,dc=lab,dc=test
    ldap_role_attribute: str = ""  # e.g. memberOf; empty: LDAP users get ldap_default_role
    ldap_role_map: str = ""  # "teachers=teacher; labadmins=admin" (value, or a group's cn)
    ldap_default_role: str = "student"
    ldap_timeout: float = 5.0  # connect and each answer, seconds
    timezone: str = ""  # the lab's, for "--at 08:00"; empty: the machine's
    room_job_interval: float = 1.0  # how often the owning conductor advances its room jobs
    # Room deploys: multicast from this many seats up ("auto"). Below it unicast wins: N
    # seats share an uplink of about 10 seat links, multicast runs at one seat link.
    multicast_min_seats: int = 10
    multicast_groups: str = "239.255.77.0/24"  # one group per running job
    multicast_port: int = 47700  # data; requests (NACKs) come back to port + 1
    multicast_rate: int = 90_000_000  # bit/s ceiling: below the slowest seat link
    multicast_ttl: int = 1
    # Students' sessions of TP templates (images/overlays, conductor/session_store.py): where their
    # disks live and the iSCSI portal the seats boot them from.
    overlay_backend: str = "local"  # local (qcow2 overlays) | ceph (RBD clones)
    overlay_dir: Path | None = None  # the local store; default: state_dir/overlays
    overlay_run_dir: Path | None = None  # sockets, FUSE mounts, tgtd; default: /run/labmetal/...
    ceph_conf: Path = Path("/etc/ceph/ceph.conf")
    ceph_pool: str = "labmetal"
    ceph_client: str = "admin"  # the cephx client id (client.admin)
    ceph_timeout: float = 10.0  # seconds before Ceph counts as unavailable
    # each step of a bulk copy (a template's import, a session's copy or blocks): a busy
    # server is slow, not down
    ceph_bulk_timeout: float = 600.0
    ceph_object_order: int = 16  # a session clone's objects: 2**N bytes, each copied up whole
    iscsi_portal: str = ""  # HOST:PORT seats reach session targets at; default seat_url's host:3260
    session_quota_mib: int = 0  # what one session may use (its changes and saves); 0: no limit
    class_quota_mib: int = 0  # what all sessions of one template may use together; 0: no limit
    # A running session whose seat logged in to its disk, then has not been for this many
    # seconds, ends (a seat switched off by hand); 0: only power-off and stop end sessions.
    session_disconnect_end: float = 120.0
    # Local sessions (issue 16): the cache a seat keeps at the end of its disk for a
    # template version and a student's overlay (agent/seat_cache.py), a multiple of 64; and
    # the overlay's chunk (the device-mapper snapshot's, and what goes up and down).
    seat_cache_mib: int = 32768
    session_chunk_kib: int = 64
    # Seconds an idle seat shows its menu (log in to a TP session, or the default: its
    # disk); 0: no menu. Only with accounts (auth = http_basic): a login needs them.
    seat_menu_timeout: int = 5
    # The seat login's first language ("en" or "fr"); the student can switch at the seat.
    seat_language: str = "en"

    # -- what each part receives (see the module's docstring) ---------------------------
    @property
    def service(self) -> ServiceSettings:
        return self._group(ServiceSettings)

    @property
    def front_end(self) -> FrontSettings:
        return self._group(FrontSettings)

    @property
    def access(self) -> AccessSettings:
        return self._group(AccessSettings)

    @property
    def directory(self) -> DirectorySettings:
        return self._group(DirectorySettings)

    @property
    def conductor(self) -> ConductorSettings:
        return self._group(ConductorSettings)

    @property
    def power(self) -> PowerSettings:
        return self._group(PowerSettings)

    @property
    def deploy(self) -> DeploySettings:
        return self._group(DeploySettings)

    @property
    def images(self) -> ImageSettings:
        return self._group(ImageSettings)

    @property
    def boot(self) -> BootSettings:
        return self._group(BootSettings)

    @property
    def room_jobs(self) -> RoomJobSettings:
        return self._group(RoomJobSettings)

    @property
    def session_store(self) -> SessionStoreSettings:
        return self._group(SessionStoreSettings)

    def _group(self, kind: type[G]) -> G:
        """A group's fields, owned or borrowed, are fields or derived values of this
        record with the same names."""
        names = [f.name for f in dataclasses.fields(kind)]  # type: ignore[arg-type]
        return kind(**{name: getattr(self, name) for name in names})

    # -- derived values many callers read ------------------------------------------------
    @property
    def database_url(self) -> str:
        return self.service.database_url

    @property
    def image_path(self) -> Path:
        return self.images.image_path

    @property
    def seat_base_url(self) -> str:
        return self.front_end.seat_base_url

    @property
    def seat_https_url(self) -> str | None:
        return self.front_end.seat_https_url

    @property
    def tls_dir(self) -> Path:
        return self.front_end.tls_dir


# The groups, by the Settings property that builds each.
GROUPS: dict[str, type] = {
    "service": ServiceSettings, "front_end": FrontSettings, "access": AccessSettings,
    "directory": DirectorySettings, "conductor": ConductorSettings, "power": PowerSettings,
    "deploy": DeploySettings, "images": ImageSettings, "boot": BootSettings,
    "room_jobs": RoomJobSettings, "session_store": SessionStoreSettings,
}


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach ``host``: a loopback address, or a name that
    resolves to loopback addresses only. The wildcard (0.0.0.0, ::) is not."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        found = {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except (OSError, UnicodeError):
        return False
    return bool(found) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback
                               for a in found)


def split_host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _coerce(name: str, raw: Any) -> Any:
    kind = {f.name: f.type for f in dataclasses.fields(Settings)}[name]
    if raw is None:
        return None
    if "Path" in str(kind):
        return Path(raw)
    if kind in ("float", float):
        return float(raw)
    if kind in ("int", int):
        return int(raw)
    if kind in ("bool", bool):
        if isinstance(raw, bool):
            return raw
        if str(raw).lower() in ("1", "true", "yes", "on"):
            return True
        if str(raw).lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name} must be true or false, not {raw!r}")
    return str(raw)


# Settings that were, and why they went: a config file that still names one starts with a
# warning (an upgrade must not stop a lab's service), not with the error of a typo.
RETIRED = {
    "ipmi_attempt_timeout": "each IPMI packet is resent on its own; see ipmi_packet_timeout",
    "ipmi_retries": "each IPMI packet is resent until ipmi_deadline",
}


def load_settings(overrides: Mapping[str, Any] | None = None, config_file: str | Path | None = None,
                  environ: Mapping[str, str] | None = None) -> Settings:
    """Merge the sources; unknown names in the file are an error, not silently ignored."""
    environ = os.environ if environ is None else environ
    names = {f.name for f in dataclasses.fields(Settings)}
    values: dict[str, Any] = {}
    config_file = config_file or environ.get("LABMETAL_CONFIG")
    if config_file:
        with open(config_file, "rb") as fh:
            section = tomllib.load(fh).get("labmetal", {})
        unknown = set(section) - names - set(RETIRED)
        if unknown:
            raise ValueError(f"unknown settings in {config_file}: {', '.join(sorted(unknown))}")
        for name in sorted(set(section) & set(RETIRED)):
            LOG.warning("%s: setting %s is no longer used (%s); it is ignored", config_file,
                        name, RETIRED[name])
            del section[name]
        values.update(section)
    for name in names:
        env_value = environ.get(f"LABMETAL_{name.upper()}")
        if env_value is not None:
            values[name] = env_value
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = value
    settings = Settings(**{name: _coerce(name, value) for name, value in values.items()})
    if settings.auth not in ("noauth", "http_basic"):
        raise ValueError(f"auth must be noauth or http_basic, not {settings.auth!r}")
    split_host_port(settings.listen)
    if settings.front not in ("nginx", "none"):
        raise ValueError(f"front must be nginx or none, not {settings.front!r}")
    if settings.tls_listen and not settings.tls_listen.isdigit():
        split_host_port(settings.tls_listen)
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise ValueError("tls_cert and tls_key go together: the certificate and its key")
    if settings.client_timeout <= 0:
        raise ValueError(f"client_timeout is seconds, more than 0, not "
                         f"{settings.client_timeout}")
    if settings.overlay_backend not in ("local", "ceph"):
        raise ValueError(f"overlay_backend must be local or ceph, not "
                         f"{settings.overlay_backend!r}")
    if settings.uefi_loader not in ("shim", "ipxe"):
        raise ValueError(f"uefi_loader must be shim or ipxe, not {settings.uefi_loader!r}")
    if settings.iscsi_portal:
        split_host_port(settings.iscsi_portal)
    if settings.session_quota_mib < 0 or settings.class_quota_mib < 0:
        raise ValueError("session_quota_mib and class_quota_mib are MiB, 0 for no limit")
    if not 12 <= settings.ceph_object_order <= 25:
        raise ValueError(f"ceph_object_order must be 12 to 25 (RBD objects of 4 KiB to "
                         f"32 MiB), not {settings.ceph_object_order}")
    return settings
