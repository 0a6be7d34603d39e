"""What the API's views share: the service objects of one running API, reached through
``services()`` from the Flask application that carries them.

It lives apart from ``api/app.py`` so that views import it without importing the
application factory, which imports every view: no import circle between the views.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

from flask import current_app

from labmetal.conductor.door import NodeDoor
from labmetal.conductor.drivers import HardwareType
from labmetal.conductor.job_door import RoomJobDoor
from labmetal.conductor.registry import ConductorRegistry
from labmetal.conductor.rpcapi import ConductorAPI
from labmetal.conductor.seat_sync import SeatSync
from labmetal.conductor.session_door import SessionDoor
from labmetal.conductor.session_store import Storage
from labmetal.config import Settings
from labmetal.db import Database
from labmetal.policy import Policy
from labmetal.secrets import SecretBox

if TYPE_CHECKING:  # ldap3 is loaded only where LDAP is set up
    from labmetal.directory import Directory

# The web pages' signed session cookie (api/app.py sets it, the OpenAPI document names it).
SESSION_COOKIE = "labmetal_session"


@dataclass
class Services:
    settings: Settings
    db: Database
    registry: ConductorRegistry
    conductors: ConductorAPI
    drivers: dict[str, HardwareType]
    box: SecretBox
    policy: Policy = field(default_factory=Policy.defaults)
    directory: Directory | None = None  # LDAP, when ldap_url is set

    @cached_property
    def door(self) -> NodeDoor:
        """The one door to a node's conductor (conductor/door.py)."""
        return NodeDoor(self.settings.deploy, self.db, self.drivers, self.box, self.conductors)


    @cached_property
    def session_store(self) -> Storage:
        """The students' sessions' store of this process (conductor/session_store.py)."""
        return Storage(self.settings.session_store, self.db)

    @cached_property
    def sessions(self) -> SessionDoor:
        """The one door to students' sessions (conductor/session_door.py)."""
        return SessionDoor(self.db, self.box, self.session_store, self.door,
                           self.settings.session_store.class_quota_mib)

    @cached_property
    def seat_sync(self) -> SeatSync:
        """Local sessions' trips between seats and the store (conductor/seat_sync.py)."""
        from labmetal.images.store import ImageStore
        return SeatSync(self.db, self.box, self.session_store,
                        ImageStore(self.settings.image_path, self.settings.max_image_size),
                        self.settings.session_store)

    @cached_property
    def jobs(self) -> RoomJobDoor:
        """The one door to room jobs (conductor/job_door.py)."""
        return RoomJobDoor(self.db, self.conductors, self.settings.timezone)


def services() -> Services:
    return current_app.extensions["labmetal"]
