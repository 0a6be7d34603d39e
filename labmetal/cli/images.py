"""`labmetal images ...`: upload, list, show, capture and delete images, and build the deploy
ramdisk, through the REST API (reached as labmetal/client.py says)."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

from labmetal.cli.output import print_fields, print_table
from labmetal.cli.parsing import Group
from labmetal.cli.progress import Progress
from labmetal.client import Client, CliError
from labmetal.images.ramdisk import Recipe

KINDS = ("whole-disk", "partition", "kernel", "ramdisk")
PIECE_SIZE = 1024 * 1024
TABLE_COLUMNS = (("NAME", "name"), ("KIND", "kind"), ("STATUS", "status"),
                 ("FORMAT", "disk_format"), ("SIZE", "size"), ("VIRTUAL", "virtual_size"),
                 ("UUID", "uuid"))
SIZE_FIELDS = ("size", "virtual_size", "packed_size")


def file_pieces(path: Path, progress: Progress) -> Iterator[bytes]:
    with open(path, "rb") as image:
        while piece := image.read(PIECE_SIZE):
            yield piece
            progress.add(len(piece))
    progress.ended = time.monotonic()


# -- commands ----------------------------------------------------------------------------
def cmd_upload(client: Client, args: argparse.Namespace) -> Any:
    request = {"name": args.name, "kind": args.kind, "disk_format": args.format,
               "sha256": args.sha256, "kernel": args.kernel, "ramdisk": args.ramdisk,
               "description": args.description}
    return upload_file(client, Path(args.file), request)


def upload_file(client: Client, path: Path, request: dict[str, Any]) -> Any:
    """Register an image, then stream its data; a refused upload leaves no record."""
    if not path.is_file():
        raise CliError(f"{path}: no such file")
    image = client.call("POST", "/v1/images",
                        json={key: value for key, value in request.items() if value is not None})
    progress = Progress(request["name"], path.stat().st_size, sys.stderr)
    try:
        image = client.call("PUT", f"/v1/images/{image['uuid']}/data",
                            data=file_pieces(path, progress),
                            headers={"Content-Type": "application/octet-stream"})
    except BaseException:
        # The record this command made would only block the next try under the same name.
        try:
            client.call("DELETE", f"/v1/images/{image['uuid']}")
        except CliError:
            pass
        raise
    progress.finish()
    return image


def cmd_build_ramdisk(client: Client, args: argparse.Namespace) -> Any:
    """Build (or reuse) the deploy kernel and initramfs and register both as images, named
    after the build's version so that nodes using an older ramdisk keep it."""
    from labmetal.images.ramdisk import build_ramdisk, sha256_file
    build = build_ramdisk(Path(args.cache), force=args.force,
                          recipe=Recipe(kernel_package=args.kernel_package),
                          progress=lambda line: print(line, file=sys.stderr, flush=True))
    registered = {}
    for kind, path in (("kernel", build.kernel), ("ramdisk", build.initramfs)):
        name = f"{args.prefix}-{kind}-{build.version_key[:12]}"
        digest = sha256_file(path)
        try:
            existing = client.call("GET", f"/v1/images/{name}")
        except CliError:
            existing = None
        if existing is not None and existing["status"] == "active":
            if existing["sha256"] != digest:
                raise CliError(f"image {name} exists with other content; delete it first")
        else:
            if existing is not None:
                client.call("DELETE", f"/v1/images/{name}")
            upload_file(client, path, {"name": name, "kind": kind, "sha256": digest,
                                       "description": f"labmetal deploy {kind} "
                                                      f"{build.version_key[:12]}"})
        registered[kind] = name
    print(f"deploy kernel and ramdisk: {registered['kernel']}, {registered['ramdisk']} "
          "(use them as driver_info deploy_kernel/deploy_ramdisk or the deploy_kernel/"
          "deploy_ramdisk settings)", file=sys.stderr)
    return {"deploy_kernel": registered["kernel"], "deploy_ramdisk": registered["ramdisk"],
            "version_key": build.version_key, "build_reused": build.reused}


def cmd_capture(client: Client, args: argparse.Namespace) -> Any:
    """Capture a node's disk into a new image, showing the progress until it is done."""
    started = client.call("POST", f"/v1/nodes/{args.node}/capture",
                          json={"image": args.name, "description": args.description})
    progress: Progress | None = None
    while True:
        node = client.call("GET", f"/v1/nodes/{started['node']}")
        step = node.get("deploy_step") or {}
        if step.get("total"):
            if progress is None:
                progress = Progress(args.name, int(step["total"]), sys.stderr, verb="capture")
            progress.add(int(step.get("done", 0)) - progress.sent)
        if node["provision_state"] == "manageable" and not node.get("reservation"):
            break
        time.sleep(1)
    if node.get("last_error"):
        raise CliError(node["last_error"])
    image = client.call("GET", f"/v1/images/{started['image']}")
    if progress is None:  # done between two looks
        progress = Progress(args.name, image.get("virtual_size") or 0, sys.stderr,
                            verb="capture")
    progress.add(progress.total - progress.sent)
    progress.finish()
    return image


def cmd_list(client: Client, args: argparse.Namespace) -> Any:
    path = "/v1/images" + (f"?kind={args.kind}" if args.kind else "")
    images: list[dict[str, Any]] = []
    while path:
        page = client.call("GET", path)
        images += page["images"]
        following = urlsplit(page.get("next", ""))
        path = f"{following.path}?{following.query}" if following.path else ""
    return images


def cmd_show(client: Client, args: argparse.Namespace) -> Any:
    return client.call("GET", f"/v1/images/{args.name}")


def cmd_delete(client: Client, args: argparse.Namespace) -> Any:
    client.call("DELETE", f"/v1/images/{args.name}")
    print(f"deleted image {args.name}", file=sys.stderr)
    return None


# -- output ------------------------------------------------------------------------------
def human_size(value: Any) -> str:
    if not isinstance(value, int):
        return "" if value is None else str(value)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000:
            return f"{value} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def show_images(result: list[dict[str, Any]] | dict[str, Any]) -> None:
    """A list of images as a table, one image (or a command's answer) as its fields."""
    if isinstance(result, list):
        print_table([title for title, _ in TABLE_COLUMNS],
                    [[human_size(image[key]) if key in SIZE_FIELDS else str(image[key] or "")
                      for _, key in TABLE_COLUMNS] for image in result])
    else:
        print_fields({key: human_size(value) if key in SIZE_FIELDS else value
                      for key, value in result.items()})


def register(top: Group) -> None:
    images = top.group("images", help="the image store: upload, list, show, delete")

    upload = images.command("upload", cmd_upload, human=show_images,
                            help="register an image and upload it")
    upload.add_argument("name")
    upload.add_argument("file")
    upload.add_argument("--kind", required=True, choices=KINDS)
    upload.add_argument("--format", choices=("raw", "qcow2"),
                        help="disk format of the file (default: detected)")
    upload.add_argument("--kernel", help="kernel image of a partition image (name or UUID)")
    upload.add_argument("--ramdisk", help="ramdisk image of a partition image (name or UUID)")
    upload.add_argument("--sha256", help="checksum the upload must have")
    upload.add_argument("--description")

    listing = images.command("list", cmd_list, human=show_images, help="list images")
    listing.add_argument("--kind", choices=KINDS)

    show = images.command("show", cmd_show, human=show_images, help="show one image")
    show.add_argument("name", help="name or UUID")

    ramdisk = images.command("build-ramdisk", cmd_build_ramdisk, human=show_images,
                             help="build the deploy kernel + initramfs (Debian packages, "
                                  "cached) and register them as images")
    ramdisk.add_argument("--cache", default=os.environ.get("LABMETAL_RAMDISK_CACHE",
                                                           "/var/cache/labmetal/ramdisk"))
    ramdisk.add_argument("--prefix", default="deploy", help="image names: PREFIX-kernel-KEY")
    ramdisk.add_argument("--force", action="store_true", help="rebuild even if cached")
    ramdisk.add_argument("--kernel-package", default=Recipe.kernel_package,
                         help="Debian kernel package (default: %(default)s, with real PCs' "
                              "drivers; linux-image-cloud-amd64 boots VMs only)")

    capture = images.command("capture", cmd_capture, human=show_images,
                             help="read a manageable node's disk into a new whole-disk image")
    capture.add_argument("node", help="node name or UUID (a reference PC)")
    capture.add_argument("name", help="name of the new image")
    capture.add_argument("--description")

    delete = images.command("delete", cmd_delete, human=show_images,
                            help="delete an image and its files")
    delete.add_argument("name", help="name or UUID")
