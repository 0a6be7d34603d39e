"""How labmetal names things: the UUID a person may type in place of a name, and the iSCSI
qualified names of seats and sessions.

Pure and import-light, so the API, the conductor and the CLIs share one rule. The deploy
agent keeps its own copy of the IQN prefix (``agent/commands.py``): the ramdisk carries
the agent package alone.
"""
from __future__ import annotations

import uuid as uuidlib

IQN_PREFIX = "iqn.2026-11.org.labmetal"


def is_uuid(value: str) -> bool:
    """A UUID in its canonical form, any case: names are never UUIDs, so this picks the
    column a name-or-UUID is looked up in."""
    try:
        return str(uuidlib.UUID(value)) == value.lower()
    except ValueError:
        return False


def seat_iqn(node_uuid: str) -> str:
    """The initiator name a seat's iPXE uses, and the deploy agent's target name."""
    return f"{IQN_PREFIX}:{node_uuid}"


def session_iqn(session_uuid: str) -> str:
    return f"{IQN_PREFIX}:session.{session_uuid}"
