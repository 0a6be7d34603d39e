"""The deploy ramdisk: named by its inputs, reused from the cache, reproducible archives,
and a seat that boots it under QEMU reaches the agent, which looks itself up by MAC."""
from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest
import zstandard

from labmetal.images import ramdisk
from labmetal.images.ramdisk import (INITRAMFS, KERNEL, RECORD, Inputs, Recipe, build_ramdisk,
                                     select_modules, version_key, write_cpio, write_initramfs)

REPOSITORY = Path(__file__).resolve().parents[1]
MARKER = "labmetal-ramdisk: starting agent"
SEAT_MAC = "52:54:00:4c:4d:01"


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """An agent package: what the ramdisk copies, whole."""
    root = tmp_path / "agent"
    root.mkdir()
    for name, content in {"__init__.py": "", "__main__.py": "print('agent')\n",
                          "manifest.py": "CHUNK_SIZE = 1\n"}.items():
        (root / name).write_text(content)
    return root


def fake_build(recipe, inputs, work, key, progress) -> None:
    out = work / "out"
    out.mkdir()
    for name in (KERNEL, INITRAMFS, RECORD):
        (out / name).write_text(f"{name} of {key}")


def key_of(source: Path, recipe: Recipe = Recipe()) -> str:
    return version_key(recipe, Inputs.read(source))


def test_the_key_follows_every_input_and_nothing_else(source, tmp_path, monkeypatch):
    recipe = Recipe()
    key = key_of(source)
    assert re.fullmatch(r"[0-9a-f]{16}", key)

    (source / "__pycache__").mkdir()
    (source / "__pycache__" / "main.cpython-311.pyc").write_bytes(b"\0")
    (source / ".main.py.swp").write_bytes(b"\0")
    (source.parent / "store.py").write_text("import flask\n")  # not in the agent package
    assert key_of(source) == key

    changed = {key_of(source, Recipe(packages=(*recipe.packages, "gdisk"))),
               key_of(source, Recipe(kernel_package="linux-image-cloud-amd64")),
               key_of(source, Recipe(sources=recipe.sources[:1]))}
    (source / "__main__.py").write_text("print('agent v2')\n")
    changed.add(key_of(source))
    (source / "commands").mkdir()
    (source / "commands" / "power.py").write_text("")
    changed.add(key_of(source))
    (source / "manifest.py").write_text("CHUNK_SIZE = 2\n")
    changed.add(key_of(source))
    init = tmp_path / "init.sh"
    init.write_text(ramdisk.INIT_SCRIPT.read_text() + "# changed\n")
    monkeypatch.setattr(ramdisk, "INIT_SCRIPT", init)
    changed.add(key_of(source))
    assert key not in changed and len(changed) == 7
    assert "labmetal/agent/commands/power.py" in Inputs.read(source).labmetal


def test_a_second_call_reuses_the_cached_build_without_root(source, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setattr(ramdisk.os, "geteuid", lambda: 0)
    monkeypatch.setattr(ramdisk, "_build", fake_build)
    first = build_ramdisk(cache, agent_dir=source, progress=lambda line: None)
    assert not first.reused
    assert first.kernel == cache / first.version_key / KERNEL
    assert first.initramfs.read_text() == f"{INITRAMFS} of {first.version_key}"
    assert sorted(path.name for path in cache.iterdir()) == [".lock", first.version_key]

    def no_build(*args):
        raise AssertionError("rebuilt although cached")
    monkeypatch.setattr(ramdisk, "_build", no_build)
    monkeypatch.setattr(ramdisk.os, "geteuid", lambda: 1000)
    messages: list[str] = []
    again = build_ramdisk(cache, agent_dir=source, progress=messages.append)
    assert again.reused and again.kernel == first.kernel and again.initramfs == first.initramfs
    assert messages == [f"deploy ramdisk {first.version_key}: reusing {cache / first.version_key}"]


def test_building_needs_root_and_a_failed_build_leaves_nothing(source, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setattr(ramdisk.os, "geteuid", lambda: 1000)
    with pytest.raises(PermissionError, match="needs root"):
        build_ramdisk(cache, agent_dir=source, progress=lambda line: None)

    def failing_build(recipe, inputs, work, key, progress):
        (work / "rootfs").mkdir()
        raise RuntimeError("mmdebstrap failed")
    monkeypatch.setattr(ramdisk.os, "geteuid", lambda: 0)
    monkeypatch.setattr(ramdisk, "_build", failing_build)
    with pytest.raises(RuntimeError, match="mmdebstrap failed"):
        build_ramdisk(cache, agent_dir=source, progress=lambda line: None)
    assert [path.name for path in cache.iterdir()] == [".lock"]


def test_force_replaces_the_cached_build(source, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setattr(ramdisk.os, "geteuid", lambda: 0)
    monkeypatch.setattr(ramdisk, "_build", fake_build)
    first = build_ramdisk(cache, agent_dir=source, progress=lambda line: None)
    first.kernel.write_text("stale")
    again = build_ramdisk(cache, agent_dir=source, force=True, progress=lambda line: None)
    assert not again.reused and again.kernel == first.kernel
    assert again.kernel.read_text() == f"{KERNEL} of {first.version_key}"
    assert not [path for path in cache.iterdir() if path.name.startswith(".build-")]


def test_modules_are_sorted_by_how_the_kernel_has_them(tmp_path):
    (tmp_path / "modules.dep").write_text(
        "kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko "
        "kernel/net/core/failover.ko\n"
        "kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko\n"
        "kernel/net/core/failover.ko:\n"
        "kernel/drivers/block/loop.ko:\n")
    (tmp_path / "modules.builtin").write_text("kernel/drivers/nvme/host/nvme.ko\n")
    modules = select_modules(tmp_path, ("virtio_net", "nvme", "e1000e", "loop"))
    assert modules.loadable == ["virtio_net", "loop"]
    assert modules.builtin == ["nvme"] and modules.missing == ["e1000e"]
    assert modules.files == ["kernel/drivers/block/loop.ko", "kernel/drivers/net/net_failover.ko",
                             "kernel/drivers/net/virtio_net.ko", "kernel/net/core/failover.ko"]


def test_the_initramfs_archive_is_reproducible_and_unpacks(tmp_path):
    tree = tmp_path / "tree"
    (tree / "usr" / "bin").mkdir(parents=True)
    (tree / "usr" / "bin" / "tool").write_bytes(b"#!/bin/sh\necho tool\n")
    (tree / "usr" / "bin" / "tool").chmod(0o755)
    os.link(tree / "usr" / "bin" / "tool", tree / "usr" / "bin" / "tool-again")
    (tree / "bin").symlink_to("usr/bin")
    (tree / "empty").write_bytes(b"")
    (tree / "odd").write_bytes(b"123")
    epoch = 1735689600

    first = io.BytesIO()
    size = write_cpio(tree, first, epoch)
    assert size == len(first.getvalue()) and size % 4 == 0
    os.utime(tree / "odd", (0, 0))
    again = io.BytesIO()
    write_cpio(tree, again, epoch)
    assert again.getvalue() == first.getvalue()
    compressed = io.BytesIO()
    write_initramfs(tree, compressed, epoch, level=3)
    assert zstandard.ZstdDecompressor().decompressobj().decompress(
        compressed.getvalue()) == first.getvalue()

    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    subprocess.run(["cpio", "--extract", "--make-directories", "--preserve-modification-time",
                    "--quiet"], input=first.getvalue(), cwd=unpacked, check=True)
    tool, tool_again = unpacked / "usr" / "bin" / "tool", unpacked / "usr" / "bin" / "tool-again"
    assert tool.read_bytes() == b"#!/bin/sh\necho tool\n" and tool.stat().st_mode & 0o777 == 0o755
    assert os.path.samefile(tool, tool_again)
    assert os.readlink(unpacked / "bin") == "usr/bin"
    assert (unpacked / "odd").read_bytes() == b"123" and (unpacked / "empty").read_bytes() == b""
    assert (unpacked / "odd").stat().st_mtime == epoch


# -- a real build, booted under QEMU -----------------------------------------------------------

class AgentEndpoints(BaseHTTPRequestHandler):
    """Records what the agent asks; every node is unknown (Ironic's 404)."""
    requests: list[tuple[float, str]]

    def do_GET(self) -> None:
        self.requests.append((time.monotonic(), self.path))
        body = b'{"error_message": "{\\"faultstring\\": \\"node not found\\"}"}'
        self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args) -> None:
        pass


# Run by the image's own python3 inside the unpacked image: every module of the agent
# package (``__main__`` runs the agent: its import is main.py's), with the Debian packages
# the image has, and nothing from this machine.
IMPORT_EVERY_AGENT_MODULE = """
import importlib, pkgutil, labmetal.agent
for module in pkgutil.walk_packages(labmetal.agent.__path__, "labmetal.agent."):
    if module.name != "labmetal.agent.__main__":
        importlib.import_module(module.name)
        print(module.name)
"""


@pytest.fixture(scope="module")
def built_ramdisk(tmp_path_factory):
    """The real ramdisk, built once (LABMETAL_RAMDISK_CACHE keeps it across runs)."""
    cache = Path(os.environ.get("LABMETAL_RAMDISK_CACHE")
                 or tmp_path_factory.mktemp("ramdisk-cache"))
    missing = [tool for tool in ("mmdebstrap", "qemu-system-x86_64", "cpio")
               if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"missing {', '.join(missing)}")
    started = time.monotonic()
    try:
        build = build_ramdisk(cache)
    except PermissionError as error:
        pytest.skip(str(error))
    print(f"build: {time.monotonic() - started:.1f} s (reused: {build.reused}), kernel "
          f"{build.kernel.stat().st_size / 2**20:.1f} MiB, initramfs "
          f"{build.initramfs.stat().st_size / 2**20:.1f} MiB")
    again = build_ramdisk(cache)
    assert again.reused and again.initramfs == build.initramfs
    return build


@pytest.mark.ramdisk
@pytest.mark.timeout(900)
def test_the_ramdisk_holds_the_agent_and_its_tools(built_ramdisk, tmp_path):
    with open(built_ramdisk.initramfs, "rb") as compressed:
        archive = zstandard.ZstdDecompressor().stream_reader(compressed).read()
    subprocess.run(["cpio", "--extract", "--make-directories", "--quiet"], input=archive,
                   cwd=tmp_path, check=True)
    assert os.access(tmp_path / "init", os.X_OK)
    site = tmp_path / "usr" / "lib" / "python3" / "dist-packages" / "labmetal"
    assert sorted(path.name for path in site.iterdir()) == ["__init__.py", "__pycache__",
                                                             "agent"]
    # The agent package whole, as installed: nothing listed by hand, nothing left out.
    installed = {path.relative_to(REPOSITORY / "agent"): path.read_bytes()
                 for path in (REPOSITORY / "agent").rglob("*.py")}
    carried = {path.relative_to(site / "agent"): path.read_bytes()
               for path in (site / "agent").rglob("*.py")}
    assert carried == installed
    for tool in ("python3", "tgtd", "tgtadm", "parted", "mkfs.ext4", "mkfs.vfat", "extlinux",
                 "losetup", "wipefs", "mount", "ip", "busybox", "modprobe", "poweroff",
                 "mcopy", "mmd", "blkid"):
        assert any((tmp_path / "usr" / place / tool).exists() for place in ("bin", "sbin")), tool
    assert (tmp_path / "usr" / "lib" / "syslinux" / "mbr" / "mbr.bin").is_file()
    # Debian's signed shim and GRUB, for UEFI partition images that carry none
    for name in ("shimx64.efi", "grubx64.efi"):
        loader = tmp_path / "usr" / "lib" / "labmetal" / "efi" / name
        assert loader.read_bytes()[:2] == b"MZ", name  # a PE image
    # Real PCs' drivers are in, found by the hardware's modalias; the agent's own always.
    (modules,) = (tmp_path / "usr" / "lib" / "modules").iterdir()
    aliased = {line.split()[-1] for line in (modules / "modules.alias").read_text().splitlines()
               if line.startswith("alias ")}
    for driver in ("ahci", "nvme", "usb_storage", "e1000e", "igb", "igc", "r8169", "tg3",
                   "bnx2", "ixgbe", "virtio_net", "virtio_blk"):
        assert driver in aliased, driver
    always = (tmp_path / "etc" / "labmetal" / "modules").read_text().split()
    assert set(always) <= set(Recipe().always_modules) and {"ext4", "loop"} <= set(always)
    assert always.index("crc32c_generic") < always.index("ext4")  # ext4 mounts need it
    for unwanted in ("share/man", "share/locale", "share/perl", "lib/x86_64-linux-gnu/perl"):
        assert not [path for path in (tmp_path / "usr").glob(f"{unwanted}/**/*")
                    if not path.is_dir()], unwanted
    imported = subprocess.run(
        [*([] if os.geteuid() == 0 else ["unshare", "--map-root-user"]), "chroot",
         str(tmp_path), "python3", "-c", IMPORT_EVERY_AGENT_MODULE],
        capture_output=True, text=True, env={"PATH": "/usr/bin:/usr/sbin", "LANG": "C.UTF-8"})
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert "labmetal.agent.multicast" in imported.stdout.split()
    # Bytecode checked by source mtime would be stale (every mtime is the same fixed one)
    # and compiled again at every boot; the flags word says how each .pyc is checked.
    timestamped = [path for path in tmp_path.glob("usr/lib/python3*/**/*.pyc")
                   if path.read_bytes()[4:8] != (3).to_bytes(4, "little")]
    assert not timestamped, timestamped[:5]


@pytest.mark.ramdisk
@pytest.mark.timeout(900)
def test_a_seat_boots_the_ramdisk_and_its_agent_looks_itself_up(built_ramdisk):
    requests: list[tuple[float, str]] = []
    handler = type("Handler", (AgentEndpoints,), {"requests": requests})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    console: list[tuple[float, str]] = []
    started = time.monotonic()
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-accel", "tcg", "-m", "1024", "-nographic", "-no-reboot",
         "-kernel", str(built_ramdisk.kernel), "-initrd", str(built_ramdisk.initramfs),
         "-append", f"console=ttyS0 labmetal.api=http://10.0.2.2:{server.server_port}",
         "-netdev", "user,id=n0", "-device", f"virtio-net-pci,netdev=n0,mac={SEAT_MAC}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def read_console() -> None:
        assert qemu.stdout is not None
        for raw in qemu.stdout:
            console.append((time.monotonic(), raw.decode(errors="replace").rstrip()))
    reader = threading.Thread(target=read_console, daemon=True)
    reader.start()

    def seen(pattern: str) -> tuple[float, str] | None:
        return next(((at, line) for at, line in list(console) if pattern in line), None)

    def lookup() -> tuple[float, str] | None:
        return next(((at, path) for at, path in list(requests)
                     if path.startswith("/v1/lookup") and SEAT_MAC in unquote(path).lower()),
                    None)

    try:
        deadline = started + 180
        while time.monotonic() < deadline and qemu.poll() is None:
            if lookup() or seen("labmetal-ramdisk: agent"):
                break
            time.sleep(0.2)
        time.sleep(0.5)  # the rest of a traceback, if any
        marker = seen(MARKER)
        tail = "\n".join(line for _, line in console[-40:])
        assert marker, f"no '{MARKER}' on the console:\n{tail}"
        print(f"power-on to marker: {marker[0] - started:.1f} s ({marker[1]})")
        assert SEAT_MAC in marker[1] and "10.0.2.15/24" in marker[1]
        found = lookup()
        if found:
            print(f"power-on to the agent's lookup: {found[0] - started:.1f} s ({found[1]})")
            return
        pytest.fail(f"the agent did not look itself up:\n{tail}")
    finally:
        if qemu.poll() is None:
            qemu.terminate()
            try:
                qemu.wait(10)
            except subprocess.TimeoutExpired:
                qemu.kill()
                qemu.wait()
        server.shutdown()
        server.server_close()
