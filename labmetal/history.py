"""Node history: one row per state change or error, written in the same transaction as the
change."""
from __future__ import annotations

from sqlalchemy.orm import Session

from labmetal.models import NodeHistory


def record(session: Session, node_id: int, event_type: str, event: str, severity: str = "INFO",
           conductor: str | None = None, user: str | None = None) -> None:
    session.add(NodeHistory(node_id=node_id, event_type=event_type, event=event,
                            severity=severity, conductor=conductor, user=user))
