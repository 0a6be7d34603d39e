"""Power off or reboot the seat in-band, with commands the ramdisk configures.

The command runs only after the conductor has its reply (the command API starts commands
once the response is sent), plus a moment for the reply to leave the machine: `poweroff -f`
does not wait for the network.
"""
from __future__ import annotations

import logging
import time

from labmetal.agent import tools

LOG = logging.getLogger(__name__)

REPLY_GRACE = 1.0  # seconds


def run(argv: list[str]) -> dict:
    time.sleep(REPLY_GRACE)
    LOG.info("running %s", " ".join(argv))
    tools.run(argv)
    return {"command": " ".join(argv)}
