"""Why asking for work on a node, a room job or a session was refused.

These are domain errors: the door (``conductor/door.py``) and the conductor raise them with
a message written for the person who asked, and the API maps each kind to one HTTP status in
one place (``api/errors.py``); a room job turns them into a seat's error or a retry on its
next pass. Nothing here knows about HTTP.
"""
from __future__ import annotations


class Refused(Exception):
    """The request was not taken; ``str(error)`` says why."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidRequest(Refused):
    """The request cannot apply to this object as it is (wrong state, broken credentials,
    a missing image): asking again unchanged will not help."""


class NotFound(Refused):
    """Nothing has the name or UUID asked for."""


class Forbidden(Refused):
    """The asker may do this in general, not to this object (a student, on a node that is
    no room's seat)."""


class Conflict(Refused):
    """The object's state does not allow this now (a finished job cannot be cancelled)."""


class Busy(Conflict):
    """The object is in the middle of something; the same request may work later."""


class NodeLocked(Busy):
    def __init__(self, node_uuid: str, holder: str):
        super().__init__(f"Node {node_uuid} is locked by host {holder}, please retry after "
                         "the current operation is completed.")
        self.holder = holder


class Unchanged(Busy):
    """The node was not locked but no longer matched the request's conditions."""

    def __init__(self, node_uuid: str):
        super().__init__(f"Node {node_uuid} changed state while the request was made; look "
                         "at it again and retry")


class Unavailable(Refused):
    """The service cannot take the request now (the service, not the request, is at
    fault); asking again later may work."""


class NoConductor(Unavailable):
    """No conductor is online to carry the work out."""


class Failed(Refused):
    """The work was attempted and failed in a way the asker cannot fix; the log says
    more."""
