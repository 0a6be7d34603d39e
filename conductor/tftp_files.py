"""What the conductor's TFTP makes when a PC asks, for the PCs whose boot loader has no
HTTP: Debian's signed network GRUB, the Secure Boot path (``pxe/grub.py``).

* ``grub/grub.cfg``: the chain config, the same for every PC;
* ``boot/<mac>.grub``: that PC's config, fetched from labmetal's own ``/boot/<mac>.grub``
  (seat URL), where the API renders it from the one per-MAC decision iPXE's scripts come
  from. No decision is made here, so the conductor and the API can never disagree;
* ``files/images/<uuid>/file``: a kernel or ramdisk image from the image store (disk
  images are refused: they go over HTTP or multicast, never TFTP).

Anything else is "not found". The relay has a short deadline: tftpy serves from one thread.
"""
from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from urllib.parse import urlsplit

import requests

from labmetal import seat_relay
from labmetal.db import Database
from labmetal.images.store import ImageStore
from labmetal.lookup import WRONG_KIND, ImageUnusable, usable_image
from labmetal.pxe import grub

LOG = logging.getLogger(__name__)

_CONFIG = re.compile(r"^boot/([0-9a-fA-F]{2}(?:[:-][0-9a-fA-F]{2}){5})\.grub$")
_IMAGE = re.compile(r"^files/images/([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-"
                    r"[0-9a-f]{12})/file$")
BOOT_KINDS = ("kernel", "ramdisk")


class TftpFiles:
    """``render(path, client_ip)`` for :class:`~labmetal.pxe.tftp.TftpService`."""

    def __init__(self, seat_base_url: str, db: Database, store: ImageStore,
                 relay_key: bytes | None = None, timeout: float = 10.0):
        self.base = seat_base_url.rstrip("/")
        self.db = db
        self.store = store
        self.relay_key = relay_key  # signs the seat's address for the API (seat_address.py)
        self.timeout = timeout

    def render(self, path: str, client: str) -> bytes | Path | None:
        if path == grub.CHAIN_PATH:
            return grub.chain_config().encode()
        config = _CONFIG.match(path)
        if config:
            mac = config.group(1).lower().replace(":", "-")
            url = f"{self.base}/boot/{mac}{grub.CONFIG_SUFFIX}"
            headers = {}
            if self.relay_key is not None:  # the seat's secrets go to the seat's address
                headers[seat_relay.HEADER] = seat_relay.header(
                    self.relay_key, client, urlsplit(url).path, int(time.time()))
            response = requests.get(url, headers=headers, timeout=self.timeout)
            return response.content if response.ok else None
        image = _IMAGE.match(path)
        if image:
            return self._boot_image(image.group(1))
        return None

    def _boot_image(self, uuid: str) -> Path | None:
        try:
            with self.db.read() as session:
                usable_image(session, uuid, BOOT_KINDS)
        except ImageUnusable as error:
            if error.problem == WRONG_KIND:
                LOG.warning("refused image %s (%s) over TFTP: only kernels and ramdisks",
                            error.name, error.kind)
            return None
        path = self.store.file_path(uuid)
        return path if path.is_file() else None
