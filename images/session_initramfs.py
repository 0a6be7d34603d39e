"""labmetal's session initramfs: a teacher's ordinary Linux image boots as a local session.

Local-first sessions (issue 16, DESIGN §5) run on the seat's own disk: its labmetal cache
region holds a copy of the TP template (the origin) and the student's device-mapper
persistent snapshot COW store. The template is a teacher's ordinary install, unchanged:
its own initramfs knows nothing of that layout, so labmetal boots **the template's own
kernel** (signed by its distribution: it runs under Secure Boot) with **this initramfs**,
whose /init (session_init.sh, beside this file) finds the cache region, stacks
origin + COW into a snapshot with dmsetup, mounts the root partition's range of it and
switch_roots into the template's /sbin/init. Where the kernel and the cache region are
is on the kernel command line (the contract is in session_init.sh).

Under Secure Boot a locked-down kernel loads only modules signed by its own vendor, so
the modules (device-mapper, the root's filesystem, the seat's disk drivers) come from
the template image itself, as its kernel package installed them, never from labmetal's
deploy ramdisk. Userspace (busybox, dmsetup and its libraries) is the host's.

Everything is read from the template image without mounting it (boot_files' partition
reading, e2fsprogs' debugfs on ``image?offset=N``), and treated as hostile: paths from its
modules.dep are checked before use, every file debugfs writes is bounded (RLIMIT_FSIZE)
and every debugfs run has a timeout.
"""
from __future__ import annotations

import gzip
import logging
import lzma
import re
import resource
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from labmetal.images.boot_files import (BootFilesError, Partition, _is_ext, newest_kernel,
                                        partitions)
from labmetal.images.host_binaries import MissingLibrary, with_libraries
from labmetal.images.ramdisk import install_file, write_cpio

LOG = logging.getLogger(__name__)

INIT_SCRIPT = Path(__file__).resolve().parent / "session_init.sh"
SAVE_SCRIPT = Path(__file__).resolve().parent / "session_save.sh"  # /run/labmetal/save
BUSYBOX = Path("/bin/busybox")  # busybox-static
DMSETUP = Path("/usr/sbin/dmsetup")
EPOCH = 1735689600  # the archive's timestamps: same inputs, same bytes
LOAD_ORDER = "lib/modules/load-order"  # in the initramfs: one file name a line
# What the session needs from the template's kernel, if it has them as modules: the
# snapshot (dm_mod, dm_snapshot), the root filesystem with the checksum ext4 asks the
# crypto API for at mount time (no modprobe here to load it on demand), and the disks of
# room PCs and VMs.
DEVICE_MAPPER = ("dm_mod", "dm_snapshot")
FILESYSTEM_MODULES = {"ext4": ("ext4", "crc32c_generic", "crc32c_intel"),
                      "ext3": ("ext4", "crc32c_generic", "crc32c_intel"),
                      "ext2": ("ext4", "crc32c_generic", "crc32c_intel")}
DISK_MODULES = ("virtio_pci", "virtio_blk", "nvme", "ahci", "sd_mod", "usb_storage", "uas")
MODULE_FILE = re.compile(r"[\w-]+\.ko(\.xz|\.zst)?")
MODULE_PATH = re.compile(r"(?:[\w.+-]+/)*[\w-]+\.ko(?:\.xz|\.zst)?")
VERSION = re.compile(r"[\w.+~-]{1,100}")
MAX_TABLE = 16 * 1024 * 1024  # modules.dep, modules.builtin
MAX_FILE = 64 * 1024 * 1024  # any file read: a module (ext4 is ~1.5 MiB), the kernel
MAX_MODULES = 128  # modules in the initramfs, dependencies included (32 for Debian 6.1)
MAX_MODULES_SIZE = 256 * 1024 * 1024  # all of them, as the image says before any is read
DEBUGFS_TIMEOUT = 120


class SessionBootError(Exception):
    """The template cannot boot as a local session; the message is for the admin."""


@dataclass(frozen=True)
class SessionBoot:
    kernel: Path  # the template's /boot/vmlinuz-<version>
    initramfs: Path  # labmetal's, a gzip-compressed newc cpio archive
    version: str
    root_offset: int  # bytes: the root partition's place in the template image
    root_size: int
    fstype: str  # "ext4", ...
    root_uuid: str


@dataclass(frozen=True)
class Module:
    name: str  # as the kernel names it: underscores
    path: str  # as modules.dep has it, relative to /lib/modules/<version>


def build(template: Path, into: Path) -> SessionBoot:
    """The template's kernel and labmetal's session initramfs for it, in ``into``.
    Raises SessionBootError if the template has no usable kernel, modules or snapshot
    support, BootFilesError if its partition table lies."""
    into.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="labmetal-session-initramfs-") as scratch:
        work = Path(scratch)
        try:
            partition, version, root_uuid = _find_kernel(template)
        except OSError as error:
            raise SessionBootError(f"the template cannot be read: {error}") from error
        dumped = work / "vmlinuz"  # ``into`` may hold what a debugfs command cannot
        _debugfs(template, partition, [f"dump /boot/vmlinuz-{version} {dumped}"])
        if not dumped.is_file() or dumped.stat().st_size == 0:
            raise SessionBootError(f"/boot/vmlinuz-{version} could not be read from the "
                                   "template")
        fstype = _fstype(template, partition)
        modules_dir, dep, builtin = _module_tables(template, partition, version, work)
        wanted = (*DEVICE_MAPPER, *FILESYSTEM_MODULES.get(fstype, (fstype,)), *DISK_MODULES)
        order = resolve(dep, builtin, wanted)
        for name in ("dm_mod", "dm_snapshot", "ext4"):
            if name not in builtin and not any(module.name == name for module in order):
                raise SessionBootError(
                    f"the template's kernel {version} has no {name} (neither built in nor in "
                    f"{modules_dir}/modules.dep): it cannot boot as a local session")
        root = work / "initramfs"
        _install_modules(template, partition, modules_dir, order, root, work)
        _install_userspace(root)
        kernel = into / f"vmlinuz-{version}"
        shutil.copyfile(dumped, kernel)
        initramfs = into / f"session-initramfs-{version}.img"
        with open(initramfs, "wb") as raw, \
                gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as stream:
            write_cpio(root, stream, EPOCH)  # type: ignore[arg-type]  # a binary stream
    LOG.info("session boot for kernel %s: %d modules, root %s at %d (+%d bytes)", version,
             len(order), fstype, partition.offset, partition.size)
    return SessionBoot(kernel, initramfs, version, partition.offset, partition.size, fstype,
                       root_uuid)


def resolve(dep: dict[str, list[str]], builtin: set[str],
            wanted: tuple[str, ...]) -> list[Module]:
    """The modules to load for ``wanted``, dependencies first. ``dep`` is modules.dep as
    module name -> [its path, its dependencies' paths] (transitive, the last loaded first,
    as modprobe reads it); built-in modules are skipped, unknown ones logged."""
    order: list[Module] = []
    seen: set[str] = set()
    for name in wanted:
        if name in builtin:
            continue
        if name not in dep:
            LOG.info("module %s: neither built in nor in modules.dep, skipped", name)
            continue
        path, *needs = dep[name]
        for item in [*reversed(needs), path]:
            module = Module(module_name(item), item)
            if module.name not in seen:
                seen.add(module.name)
                order.append(module)
    if len(order) > MAX_MODULES:
        raise SessionBootError(f"{len(order)} modules to load: more than {MAX_MODULES}")
    return order


def module_name(path: str) -> str:
    """The kernel's name of a module file: kernel/drivers/md/dm-mod.ko.xz -> dm_mod."""
    return path.rsplit("/", 1)[-1].split(".ko")[0].replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """modules.dep as name -> [path, dependency paths...]; lines naming a path that is not a
    plain relative module path are ignored (logged): they would be read from the image."""
    table: dict[str, list[str]] = {}
    for line in text.splitlines():
        path, colon, needs = line.partition(":")
        paths = [path.strip(), *needs.split()]
        if not colon or not all(_safe_module_path(item) for item in paths):
            if line.strip():
                LOG.info("modules.dep: line ignored: %r", line[:200])
            continue
        table[module_name(paths[0])] = paths
    return table


def parse_modules_builtin(text: str) -> set[str]:
    return {module_name(line.strip()) for line in text.splitlines() if line.strip()}


def _safe_module_path(path: str) -> bool:
    return (MODULE_PATH.fullmatch(path) is not None and ".." not in path.split("/")
            and MODULE_FILE.fullmatch(path.rsplit("/", 1)[-1]) is not None)


def _find_kernel(image: Path) -> tuple[Partition, str, str]:
    """The kernel boot_files.find would pick (the newest /boot/vmlinuz-<v> that has its
    initrd.img-<v>, on the first ext2/3/4 partition having one): its partition, version and
    the filesystem's UUID. Read here with the bounded debugfs, nothing copied yet."""
    for partition in partitions(image):
        if not _is_ext(image, partition):
            continue
        version = newest_kernel(_debugfs(image, partition, ["ls -p /boot"]))
        if version is None:
            continue
        if not VERSION.fullmatch(version):
            raise SessionBootError(f"kernel version {version[:100]!r}: not a version")
        stats = _debugfs(image, partition, ["stats -h"])
        uuid = re.search(r"^Filesystem UUID:\s+(\S+)", stats, re.MULTILINE)
        if uuid is None:
            raise SessionBootError(f"partition {partition.number} has no filesystem UUID")
        return partition, version, uuid.group(1)
    raise SessionBootError("no /boot/vmlinuz-<version> with its initrd.img-<version> on an "
                           "ext2/3/4 filesystem of the template: it cannot boot as a local "
                           "session")


def _fstype(image: Path, partition: Partition) -> str:
    """ext4, ext3 or ext2, from the superblock's features as debugfs reads them."""
    stats = _debugfs(image, partition, ["stats -h"])
    features = re.search(r"^Filesystem features:\s+(.*)$", stats, re.MULTILINE)
    names = set(features.group(1).split()) if features else set()
    if names & {"extent", "extents", "flex_bg", "64bit", "huge_file", "metadata_csum"}:
        return "ext4"
    return "ext3" if "has_journal" in names else "ext2"


def _module_tables(image: Path, partition: Partition, version: str,
                   work: Path) -> tuple[str, dict[str, list[str]], set[str]]:
    """Where the kernel's modules are in the image, its modules.dep and modules.builtin."""
    for modules_dir in (f"/lib/modules/{version}", f"/usr/lib/modules/{version}"):
        out = work / "tables" / modules_dir.strip("/").replace("/", "_")
        out.mkdir(parents=True)
        _debugfs(image, partition, [f"dump {modules_dir}/modules.dep {out}/dep",
                                    f"dump {modules_dir}/modules.builtin {out}/builtin"])
        dep, builtin = out / "dep", out / "builtin"
        if not dep.is_file() or dep.stat().st_size == 0:
            continue
        if dep.stat().st_size > MAX_TABLE or (builtin.is_file()
                                              and builtin.stat().st_size > MAX_TABLE):
            raise SessionBootError(f"{modules_dir}/modules.dep or modules.builtin is larger "
                                   f"than {MAX_TABLE} bytes")
        builtin_text = builtin.read_text(errors="replace") if builtin.is_file() else ""
        return (modules_dir, parse_modules_dep(dep.read_text(errors="replace")),
                parse_modules_builtin(builtin_text))
    raise SessionBootError(f"no /lib/modules/{version} in the template: it cannot boot as a "
                           "local session")


def _install_modules(image: Path, partition: Partition, modules_dir: str,
                     order: list[Module], root: Path, work: Path) -> None:
    """Dump the modules from the image in one debugfs run, decompress them, and write
    them and the load order into the initramfs (/lib/modules/<name>.ko, flat)."""
    _check_sizes(image, partition, [f"{modules_dir}/{module.path}" for module in order])
    dumped = work / "modules"
    dumped.mkdir()
    files = {module.name: dumped / f"{module.name}.ko{_suffix(module.path)}"
             for module in order}
    _debugfs(image, partition, [f"dump {modules_dir}/{module.path} {files[module.name]}"
                                for module in order])
    target = root / "lib" / "modules"
    for module in order:
        source = files[module.name]
        if not source.is_file() or source.stat().st_size == 0:
            raise SessionBootError(f"{modules_dir}/{module.path} could not be read from the "
                                   "template")
        install_file(target / f"{module.name}.ko", _decompress(source), 0o644)
    install_file(root / LOAD_ORDER,
                 "".join(f"{module.name}.ko\n" for module in order).encode(), 0o644)


def _check_sizes(image: Path, partition: Partition, paths: list[str]) -> None:
    """Refuse before dumping anything if the files' sizes, as their inodes say, add up to
    more than MAX_MODULES_SIZE (a sparse file may claim any size)."""
    output = _debugfs(image, partition, [f"stat {path}" for path in paths])
    total = sum(int(size) for size in re.findall(r"\bGroup:.*?\bSize: (\d+)", output))
    if total > MAX_MODULES_SIZE:
        raise SessionBootError(f"the template's modules to load add up to {total} bytes: "
                               f"more than {MAX_MODULES_SIZE}")


def _suffix(path: str) -> str:
    return ".xz" if path.endswith(".xz") else ".zst" if path.endswith(".zst") else ""


def _decompress(path: Path) -> bytes:
    """The module's ELF file; a signed module's signature is appended to it, so
    decompressing keeps it."""
    if path.suffix == ".xz":
        decompressor = lzma.LZMADecompressor()
        data = decompressor.decompress(path.read_bytes(), max_length=MAX_FILE + 1)
    elif path.suffix == ".zst":
        zstd = shutil.which("zstd")
        if zstd is None:
            raise SessionBootError(f"{path.name}: zstd-compressed modules need the zstd "
                                   "command (apt-get install zstd)")
        with subprocess.Popen([zstd, "-q", "-d", "-c", str(path)],
                              stdout=subprocess.PIPE) as process:
            assert process.stdout is not None
            data = process.stdout.read(MAX_FILE + 1)
            process.kill()
    else:
        data = path.read_bytes()
    if len(data) > MAX_FILE:
        raise SessionBootError(f"module {path.name} is larger than {MAX_FILE} bytes")
    if data[:4] != b"\x7fELF":
        raise SessionBootError(f"module {path.name} is not an ELF file")
    return data


def _install_userspace(root: Path) -> None:
    """busybox with a link per applet, dmsetup with its libraries, and /init."""
    install_file(root / "bin" / "busybox", BUSYBOX.read_bytes(), 0o755)
    listed = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True,
                            check=True, timeout=30).stdout.split()
    for applet in listed:
        if applet != "busybox" and re.fullmatch(r"[\w.-]+", applet):
            (root / "bin" / applet).symlink_to("busybox")
    for path, content in shared_binary(DMSETUP, "/bin/dmsetup").items():
        install_file(root / path.lstrip("/"), content, 0o755)
    for directory in ("dev", "proc", "sys", "root", "tmp", "sbin", "etc"):
        (root / directory).mkdir(mode=0o755, exist_ok=True)
    install_file(root / "init", INIT_SCRIPT.read_bytes(), 0o755)
    install_file(root / "lib" / "labmetal" / "save", SAVE_SCRIPT.read_bytes(), 0o755)


def shared_binary(binary: Path, into: str) -> dict[str, bytes]:
    """A host executable and its shared libraries, by their path in the initramfs."""
    try:
        return with_libraries(binary, into)
    except MissingLibrary as error:
        raise SessionBootError(str(error)) from None


def _debugfs(image: Path, partition: Partition, requests: list[str]) -> str:
    """Run debugfs's ``requests`` (one process, a command file) on the partition, read
    only; every file it writes is capped at MAX_FILE bytes (a sparse file in the image
    may claim any size)."""
    with tempfile.NamedTemporaryFile("w", prefix="labmetal-debugfs-", suffix=".cmd") as cmds:
        cmds.write("".join(f"{request}\n" for request in requests))
        cmds.flush()
        try:
            done = subprocess.run(["debugfs", "-f", cmds.name,
                                   f"{image}?offset={partition.offset}"],
                                  capture_output=True, text=True, errors="replace",
                                  timeout=DEBUGFS_TIMEOUT, preexec_fn=_limit_file_size)
        except subprocess.TimeoutExpired as error:
            raise SessionBootError(f"debugfs took more than {DEBUGFS_TIMEOUT} s on the "
                                   "template") from error
    if done.returncode < 0:  # SIGXFSZ: a file larger than the cap
        raise SessionBootError(f"debugfs was stopped by signal {-done.returncode} reading the "
                               f"template (a file larger than {MAX_FILE} bytes?)")
    if done.returncode != 0:
        raise BootFilesError(f"debugfs {requests[0]!r}...: {done.stderr.strip()[-300:]}")
    return done.stdout


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_FILE + 1, MAX_FILE + 1))
