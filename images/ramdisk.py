"""The deploy ramdisk: the kernel and initramfs a seat boots to be deployed by the agent.

The initramfs is a minimal Debian userland made by mmdebstrap (Python and the tools the
agent runs), the drivers a seat needs from the kernel package, labmetal's agent and an
/init script. It stays the root filesystem: the agent needs nothing from the seat's disk.

A build is named by a hash of everything it is made from (the recipe, /init, the agent's
sources, this builder) and kept in a cache directory, so the same inputs give back the
cached files. For the same package versions the bytes are reproducible: mmdebstrap runs
with a fixed SOURCE_DATE_EPOCH, Python bytecode is hash-checked instead of timestamped,
and the cpio archive is written here, sorted, with fixed mtimes. A mirror's packages move
over time (point releases, security updates), so build.json lists the versions a build
used; pin them with snapshot.debian.org sources.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import zstandard

HERE = Path(__file__).resolve().parent
INIT_SCRIPT = HERE / "ramdisk_init.sh"
UDHCPC_SCRIPT = HERE / "ramdisk_udhcpc.sh"
KERNEL = "vmlinuz"
INITRAMFS = "initramfs.img"
RECORD = "build.json"

PACKAGES = (
    "python3", "python3-requests", "python3-pyudev", "python3-zstandard", "python3-zfec",
    "tgt", "parted", "e2fsprogs", "dosfstools", "mtools", "syslinux", "extlinux", "syslinux-common",
    "util-linux", "mount", "iproute2", "busybox", "kmod",
)
# The drivers of the PCs a teaching room has, and of VMs: disks (AHCI/SATA, NVMe, USB
# storage with its host controllers, SD/eMMC, virtio, IDE), NICs (Intel e1000/e1000e/igb/
# igc/ixgbe, Realtek r8169 with its PHY driver and 8139, Broadcom tg3/bnx2, virtio), USB
# keyboards. /init loads them as the hardware asks (each device's modalias, resolved by
# modprobe against the aliases of these modules only), so a PC pays for its own drivers.
# A kernel that lacks some (the cloud kernel has none of the PC drivers) is still used;
# build.json lists what is missing.
HARDWARE_MODULES = (
    "virtio_pci", "virtio_net", "virtio_blk", "virtio_scsi", "ata_piix", "ahci", "sd_mod",
    "sr_mod", "nvme", "xhci_pci", "ehci_pci", "ohci_pci", "uhci_hcd", "usb_storage", "uas",
    "sdhci_pci", "mmc_block", "e1000", "e1000e", "igb", "igc", "ixgbe", "r8169", "realtek",
    "8139cp", "8139too", "tg3", "bnx2", "usbhid", "hid_generic",
)
# Loaded at every boot whatever the hardware: the agent's own work (loop devices, an EFI
# system partition, the root file systems it installs boot loaders into, EFI variables).
# ext4 asks the crypto API for crc32c at mount time, which modules.dep does not list: its
# mount fails ("No such file or directory") unless a crc32c module is loaded first.
ALWAYS_MODULES = ("loop", "vfat", "nls_cp437", "nls_ascii", "crc32c_generic", "crc32c_intel",
                  "ext4", "efivarfs")
MODULES = HARDWARE_MODULES + ALWAYS_MODULES
# Installed only as dependencies and removed again, 50 MB unpacked: perl, which tgt
# depends on for tgt-admin (the agent drives tgtd with tgtadm), and usrmerge with its perl
# libraries, which only converts a system to merged /usr. perl-base, which dpkg needs, stays.
UNWANTED = (
    "libconfig-general-perl", "perl", "libperl5.36", "perl-modules-5.36",
    "usrmerge", "libfile-find-rule-perl", "libnumber-compare-perl", "libtext-glob-perl",
)
# Debian's signed UEFI boot loaders, for partition images that carry none of their own (the
# agent copies them to the EFI system partition: agent/bootloader.py). Only these files are
# taken from the packages, not installed: they pull in GRUB's tools and configuration.
EFI_LOADERS = {
    "shim-signed": ("usr/lib/shim/shimx64.efi.signed", "shimx64.efi"),
    "grub-efi-amd64-signed": ("usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed",
                              "grubx64.efi"),
}
EFI_DIR = "usr/lib/labmetal/efi"  # in the image
SOURCES = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
DPKG_OPTIONS = (
    "path-exclude=/usr/share/doc/*", "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*", "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*", "path-exclude=/usr/share/lintian/*",
)


@dataclass(frozen=True)
class Recipe:
    """What the ramdisk is made of besides /init and the agent; all of it is in the key.

    To pin package versions, use snapshot sources such as
    ``deb [check-valid-until=no] http://snapshot.debian.org/archive/debian/20250520T000000Z
    bookworm main``. The kernel is Debian's generic one (``linux-image-amd64``, signed for
    Secure Boot) with the drivers of real PCs; ``linux-image-cloud-amd64`` boots VMs only
    (it has no drivers for PCs' NICs and SATA controllers) and is there on request.
    """
    suite: str = "bookworm"
    sources: tuple[str, ...] = SOURCES
    variant: str = "essential"
    packages: tuple[str, ...] = PACKAGES
    unwanted: tuple[str, ...] = UNWANTED
    kernel_package: str = "linux-image-amd64"
    efi_packages: tuple[str, ...] = tuple(EFI_LOADERS)
    modules: tuple[str, ...] = MODULES
    always_modules: tuple[str, ...] = ALWAYS_MODULES
    dpkg_options: tuple[str, ...] = DPKG_OPTIONS
    source_date_epoch: int = 1735689600  # 2025-01-01: every file's mtime in the image
    # 19: every seat downloads 12% less than at 9, for about a minute more of one build;
    # the kernel unpacks any level at about the same speed.
    zstd_level: int = 19


@dataclass(frozen=True)
class RamdiskBuild:
    kernel: Path
    initramfs: Path
    version_key: str
    reused: bool


@dataclass(frozen=True)
class KernelModules:
    """The recipe's modules as one kernel package has them."""
    loadable: list[str]  # shipped; /init loads them
    builtin: list[str]
    missing: list[str]
    files: list[str]  # of the loadable ones and their dependencies, in modules/<version>/


# The ramdisk's top-level package: only ``labmetal.agent`` is installed under it, so it
# carries none of the service's ``labmetal/__init__.py`` (nor anything that would import).
PACKAGE_INIT = b'"""labmetal, as the deploy ramdisk carries it: the agent package only."""\n'


def agent_package() -> Path:
    """The installed ``labmetal.agent`` package's folder (the checkout's ``agent/`` in a
    development install): what the ramdisk carries, whole."""
    spec = importlib.util.find_spec("labmetal.agent")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("labmetal.agent is not installed")
    return Path(list(spec.submodule_search_locations)[0]).resolve()


@dataclass(frozen=True)
class Inputs:
    """The files a build puts in the image, read once, so the key and the image agree even
    if someone edits the agent meanwhile."""
    init: bytes
    udhcpc: bytes
    labmetal: dict[str, bytes]  # by path in the image's Python path

    @classmethod
    def read(cls, agent_dir: Path | None = None) -> Inputs:
        """The scripts next to this module and the agent package, whole: every file under
        ``agent_dir`` (default: the installed ``labmetal.agent``) but bytecode and hidden
        files. The agent imports nothing of labmetal outside its own package (its wire
        formats live in it), so what a seat runs is what the tests import; a test imports
        every module inside the built image to prove it."""
        agent = agent_dir or agent_package()
        files = {"labmetal/__init__.py": PACKAGE_INIT}
        for path in sorted(agent.rglob("*")):
            relative = path.relative_to(agent)
            skipped = any(part.startswith(".") or part == "__pycache__" for part in relative.parts)
            if path.is_file() and not skipped and path.suffix != ".pyc":
                files[f"labmetal/agent/{relative.as_posix()}"] = path.read_bytes()
        if "labmetal/agent/__main__.py" not in files:
            raise RuntimeError(f"{agent} is not labmetal's agent package (no __main__.py)")
        return cls(INIT_SCRIPT.read_bytes(), UDHCPC_SCRIPT.read_bytes(), files)


def version_key(recipe: Recipe, inputs: Inputs) -> str:
    """The hash that names a build; any input that changes the output changes it."""
    digest = hashlib.sha256(json.dumps(asdict(recipe), sort_keys=True).encode())
    files = {"builder": Path(__file__).read_bytes(), "init": inputs.init,
             "udhcpc": inputs.udhcpc, **inputs.labmetal}
    for name, content in files.items():
        digest.update(f"\0{name}\0{len(content)}\0".encode())
        digest.update(content)
    return digest.hexdigest()[:16]


def build_ramdisk(cache_dir: Path, *, agent_dir: Path | None = None, force: bool = False,
                  progress: Callable[[str], None] = print,
                  recipe: Recipe = Recipe()) -> RamdiskBuild:
    """The deploy ramdisk for the installed agent (or the agent package in ``agent_dir``),
    from ``cache_dir`` if it holds a build of the same inputs, else built there (as root)."""
    inputs = Inputs.read(agent_dir)
    key = version_key(recipe, inputs)
    target = cache_dir / key
    cache_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(cache_dir / ".lock"):
        if not force and (target / RECORD).is_file():
            progress(f"deploy ramdisk {key}: reusing {target}")
            return RamdiskBuild(target / KERNEL, target / INITRAMFS, key, reused=True)
        if os.geteuid() != 0:
            raise PermissionError("building the deploy ramdisk needs root (mmdebstrap in root "
                                  "mode, chroot); reusing a cached build does not")
        work = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=cache_dir))
        work.chmod(0o755)  # apt's download sandbox (user _apt) works inside
        try:
            _build(recipe, inputs, work, key, progress)
            if target.exists():
                target.rename(work / "replaced")
            (work / "out").rename(target)
        finally:
            _remove_build_dir(work, progress)
    return RamdiskBuild(target / KERNEL, target / INITRAMFS, key, reused=False)


def _build(recipe: Recipe, inputs: Inputs, work: Path, key: str,
           progress: Callable[[str], None]) -> None:
    """Build into ``work/out``: the kernel, the initramfs and build.json, written last."""
    started = time.monotonic()
    rootfs, debs, kernel_tree, out = (work / name for name in ("rootfs", "debs", "kernel", "out"))
    debs.mkdir()
    out.mkdir()
    env = _build_env(recipe)
    progress(f"deploy ramdisk {key}: mmdebstrap {recipe.suite} ({recipe.variant}) "
             f"and {recipe.kernel_package}")
    run_step(_mmdebstrap_command(recipe, rootfs, debs), env, progress)
    (deb,) = debs.glob("linux-image-*.deb")
    run_step(["dpkg-deb", "--extract", str(deb), str(kernel_tree)], env)
    efi_packages = _install_efi_loaders(recipe, debs / "efi", work / "efi", rootfs, env)
    (modules_dir,) = (kernel_tree / "lib" / "modules").iterdir()
    kernel_version = modules_dir.name
    # The package has no modules.dep: its postinst makes one.
    run_step(["depmod", "--basedir", str(kernel_tree), kernel_version], env)
    modules = select_modules(modules_dir, recipe.modules)
    if modules.missing:
        progress(f"{kernel_version} has no {', '.join(modules.missing)}: not in the ramdisk")
    _install_modules(modules, recipe.always_modules, modules_dir, rootfs, env)
    _install_labmetal(inputs, rootfs)
    _finish_userland(rootfs, env)
    packages = run_step(["chroot", str(rootfs), "dpkg-query", "--show",
                     "--showformat=${Package}=${Version}\\n"], env).split()

    shutil.copyfile(kernel_tree / "boot" / f"vmlinuz-{kernel_version}", out / KERNEL)
    progress("writing the initramfs (cpio, zstd)")
    with open(out / INITRAMFS, "wb") as stream:
        unpacked_size = write_initramfs(rootfs, stream, recipe.source_date_epoch,
                                        recipe.zstd_level)
    record: dict[str, Any] = {
        "version_key": key,
        "kernel_package": deb.name,
        "efi_packages": efi_packages,
        "kernel_version": kernel_version,
        "kernel_size": (out / KERNEL).stat().st_size,
        "kernel_sha256": sha256_file(out / KERNEL),
        "initramfs_size": (out / INITRAMFS).stat().st_size,
        "initramfs_unpacked_size": unpacked_size,
        "initramfs_sha256": sha256_file(out / INITRAMFS),
        "modules": asdict(modules),
        "packages": packages,
        "labmetal_files": sorted(inputs.labmetal),
        "recipe": asdict(recipe),
        "build_seconds": round(time.monotonic() - started, 1),
    }
    (out / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    progress(f"deploy ramdisk {key}: kernel {kernel_version} {_mib(record['kernel_size'])}, "
             f"initramfs {_mib(record['initramfs_size'])} "
             f"({_mib(unpacked_size)} unpacked), {record['build_seconds']} s")


def _build_env(recipe: Recipe) -> dict[str, str]:
    """The build's environment: the caller's, minus what would steer the image's own Python,
    which must not leave timestamped bytecode behind while it runs compileall."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("PYTHON")}
    return env | {"SOURCE_DATE_EPOCH": str(recipe.source_date_epoch), "LC_ALL": "C",
                  "PYTHONDONTWRITEBYTECODE": "1"}


def _mmdebstrap_command(recipe: Recipe, rootfs: Path, debs: Path) -> list[str]:
    # The kernel comes as a .deb next to the userland, not installed in it: installing it
    # would pull initramfs-tools in and build an initramfs nobody uses. The hook resolves
    # the metapackage (linux-image-cloud-amd64 -> linux-image-6.1.0-NN-cloud-amd64) with
    # the same package lists as the userland.
    package = shlex.quote(recipe.kernel_package)
    fetch_kernel = (
        f'cd {shlex.quote(str(debs))} && export APT_CONFIG="$MMDEBSTRAP_APT_CONFIG" && '
        f'image=$(apt-cache depends {package} '
        '| sed -n "s/^ *Depends: \\(linux-image-[0-9].*\\)/\\1/p" | head -n 1) && '
        f'apt-get -q -o APT::Sandbox::User=root download "${{image:-{package}}}"'
    )
    if recipe.efi_packages:
        fetch_kernel += (' && mkdir efi && cd efi && apt-get -q -o APT::Sandbox::User=root '
                         'download ' + shlex.join(recipe.efi_packages))
    purge = 'chroot "$1" dpkg --purge --force-depends ' + shlex.join(recipe.unwanted)
    return [
        "mmdebstrap", f"--variant={recipe.variant}", "--mode=root", "--format=directory",
        f"--include={','.join(recipe.packages)}",
        *(f"--dpkgopt={option}" for option in recipe.dpkg_options),
        f"--customize-hook={fetch_kernel}",
        *([f"--customize-hook={purge}"] if recipe.unwanted else []),
        recipe.suite, str(rootfs), *recipe.sources,
    ]


def _install_efi_loaders(recipe: Recipe, debs: Path, work: Path, rootfs: Path,
                         env: dict[str, str]) -> list[str]:
    """The signed shim and GRUB files of ``recipe.efi_packages`` into EFI_DIR; returns the
    .deb files they came from (versions go to build.json)."""
    used = []
    for package in recipe.efi_packages:
        (deb,) = debs.glob(f"{package}_*.deb")
        tree = work / package
        tree.mkdir(parents=True)
        run_step(["dpkg-deb", "--extract", str(deb), str(tree)], env)
        inside, name = EFI_LOADERS[package]
        install_file(rootfs / EFI_DIR / name, (tree / inside).read_bytes(), 0o644)
        used.append(deb.name)
    return used


def select_modules(modules_dir: Path, wanted: tuple[str, ...]) -> KernelModules:
    """Sort ``wanted`` by how the kernel in ``modules_dir`` has each, using modules.dep
    (which lists every module's dependencies, transitively) and modules.builtin."""
    def name_of(path: str) -> str:
        return Path(path).name.split(".ko")[0].replace("-", "_")

    dependencies: dict[str, list[str]] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        path, _, needs = line.partition(":")
        dependencies[name_of(path)] = [path, *needs.split()]
    builtin = {name_of(line) for line in (modules_dir / "modules.builtin").read_text().split()}
    loadable = [name for name in wanted if name in dependencies]
    files = sorted({path for name in loadable for path in dependencies[name]})
    return KernelModules(
        loadable=loadable,
        builtin=[name for name in wanted if name not in dependencies and name in builtin],
        missing=[name for name in wanted if name not in dependencies and name not in builtin],
        files=files)


def _install_modules(modules: KernelModules, always: tuple[str, ...], modules_dir: Path,
                     rootfs: Path, env: dict[str, str]) -> None:
    """The modules' files, as the kernel package has them (signed: a kernel locked down by
    Secure Boot loads nothing else), and depmod's tables of them: modules.alias is how /init
    finds a device's driver. /etc/labmetal/modules lists those loaded whatever the
    hardware."""
    target = rootfs / "usr" / "lib" / "modules" / modules_dir.name
    for name in (*modules.files, "modules.order", "modules.builtin", "modules.builtin.modinfo"):
        install_file(target / name, (modules_dir / name).read_bytes(), 0o644)
    run_step(["chroot", str(rootfs), "depmod", modules_dir.name], env)
    install_file(rootfs / "etc" / "labmetal" / "modules",
                 "".join(f"{name}\n" for name in modules.loadable if name in always).encode(),
                 0o644)


def _install_labmetal(inputs: Inputs, rootfs: Path) -> None:
    site = rootfs / "usr" / "lib" / "python3" / "dist-packages"
    for name, content in inputs.labmetal.items():
        install_file(site / name, content, 0o644)
    install_file(rootfs / "init", inputs.init, 0o755)
    install_file(rootfs / "usr" / "lib" / "labmetal" / "udhcpc.sh", inputs.udhcpc, 0o755)


def _finish_userland(rootfs: Path, env: dict[str, str]) -> None:
    """Replace what depends on the build host, add what an init system would, compile
    Python's bytecode."""
    for leftover in (*rootfs.glob("var/cache/debconf/*-old"), *rootfs.glob("var/lib/dpkg/*-old")):
        leftover.unlink()
    install_file(rootfs / "etc" / "hostname", b"labmetal-ramdisk\n", 0o644)
    install_file(rootfs / "etc" / "resolv.conf", b"", 0o644)  # the DHCP client writes it
    # No init system, so no poweroff or reboot: busybox's (with -f they call the kernel
    # directly) are what the agent runs to power the seat off.
    for command in ("poweroff", "reboot"):
        (rootfs / "usr" / "sbin" / command).symlink_to("/usr/bin/busybox")
    # Debian's .pyc files are checked against the source's mtime, which the archive's fixed
    # mtimes would make stale: Python would compile those modules again at every boot, slowly
    # under TCG. Hash-checked bytecode holds whatever the mtimes.
    python_dirs = [f"/{path.relative_to(rootfs)}"
                   for path in sorted(rootfs.glob("usr/lib/python3*"))]
    run_step(["chroot", str(rootfs), "python3", "-m", "compileall", "-q", "-f",
          "--invalidation-mode", "checked-hash", *python_dirs], env)


def install_file(path: Path, content: bytes, mode: int) -> None:
    """Write a file into the image with the given mode, and any new directory with 0755:
    modes land in the archive, the caller's umask must not."""
    missing = [parent for parent in path.parents if not parent.exists()]
    for directory in reversed(missing):
        directory.mkdir()
        directory.chmod(0o755)
    path.write_bytes(content)
    path.chmod(mode)


def write_initramfs(root: Path, stream: BinaryIO, mtime: int, level: int) -> int:
    """Write ``root`` as a zstd-compressed initramfs; returns its uncompressed size."""
    compressor = zstandard.ZstdCompressor(level=level)
    with compressor.stream_writer(stream, closefd=False) as compressed:
        return write_cpio(root, compressed, mtime)


def write_cpio(root: Path, stream: BinaryIO, mtime: int) -> int:
    """Write the tree under ``root`` as a newc cpio archive (the format the kernel unpacks)
    and return its size. Entries are sorted, every mtime is ``mtime``, inode numbers are
    counted from 1, device numbers are 0 and directories count 2 links, so the bytes depend
    only on names, contents, modes and owners. A hard-linked file's data goes with its
    first name only, as the kernel expects."""
    written = 0

    def emit(name: str, inode: int, mode: int, uid: int = 0, gid: int = 0, nlink: int = 1,
             rdev: int = 0, data: bytes | Path = b"") -> None:
        nonlocal written
        size = data.stat().st_size if isinstance(data, Path) else len(data)
        encoded = name.encode() + b"\0"
        fields = (inode, mode, uid, gid, nlink, mtime, size, 0, 0,
                  os.major(rdev), os.minor(rdev), len(encoded), 0)
        header = b"070701" + b"".join(b"%08x" % value for value in fields) + encoded
        stream.write(header + _padding(len(header)))
        if isinstance(data, Path):
            with open(data, "rb") as source:
                shutil.copyfileobj(source, stream, 1024 * 1024)
        else:
            stream.write(data)
        stream.write(_padding(size))
        written += len(header) + len(_padding(len(header))) + size + len(_padding(size))

    first_links: dict[tuple[int, int], int] = {}
    for number, (name, path) in enumerate(_walk(root), start=1):
        info = path.lstat()
        data: bytes | Path
        inode, nlink, data = number, 1, b""
        if stat.S_ISDIR(info.st_mode):
            nlink = 2
        elif stat.S_ISLNK(info.st_mode):
            data = os.readlink(path).encode()
        elif stat.S_ISREG(info.st_mode):
            nlink = info.st_nlink
            if nlink > 1:
                inode = first_links.setdefault((info.st_dev, info.st_ino), number)
            data = path if inode == number else b""
        emit(name, inode, info.st_mode, info.st_uid, info.st_gid, nlink, info.st_rdev, data)
    emit("TRAILER!!!", 0, 0)
    return written


def _walk(root: Path) -> Iterator[tuple[str, Path]]:
    """Every path under ``root`` (not root itself), parents first, siblings by name."""
    for path in sorted(root.iterdir(), key=lambda entry: entry.name.encode()):
        name = path.relative_to(root).as_posix()
        yield name, path
        if path.is_dir() and not path.is_symlink():
            yield from ((f"{name}/{child}", child_path) for child, child_path in _walk(path))


def _padding(length: int) -> bytes:
    return b"\0" * (-length % 4)


def run_step(command: list[str], env: dict[str, str],
         progress: Callable[[str], None] | None = None) -> str:
    """Run a build step at low priority (other jobs share the cores) with umask 022
    (permissions land in the image); its output goes to ``progress`` if given."""
    process = subprocess.Popen(["nice", "-n", "10", *command], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env, umask=0o022)
    lines = []
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line)
        if progress:
            progress(f"  {line.rstrip()}")
    if process.wait() != 0:
        raise RuntimeError(f"{command[0]} failed with status {process.returncode}:\n"
                           + "".join(lines[-30:]))
    return "".join(lines)


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock: a second build waits, then reuses the first one's result
    (and two builds never share the cores)."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _remove_build_dir(work: Path, progress: Callable[[str], None]) -> None:
    # A killed mmdebstrap leaves the chroot's /proc, /sys or /dev mounted; removing the
    # tree through them would delete the host's files.
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    busy = [mount for mount in mounts if mount == str(work) or mount.startswith(f"{work}/")]
    if busy:
        progress(f"left {work} in place: {', '.join(busy)} still mounted; unmount, then remove it")
    else:
        shutil.rmtree(work)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m labmetal.images.ramdisk",
        description="Build (or reuse) the deploy ramdisk: a kernel and an initramfs "
                    "with labmetal's agent.")
    parser.add_argument("--cache", type=Path, required=True, help="the build cache directory")
    parser.add_argument("--kernel-package", default=Recipe.kernel_package,
                        help="a Debian kernel metapackage (default: %(default)s, with the "
                             "drivers of real PCs; linux-image-cloud-amd64 for VMs only)")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    build = build_ramdisk(args.cache, force=args.force,
                          recipe=Recipe(kernel_package=args.kernel_package))
    print(json.dumps({"kernel": str(build.kernel), "initramfs": str(build.initramfs),
                      "version_key": build.version_key, "reused": build.reused}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
