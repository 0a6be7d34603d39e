"""A conductor whose host does not hold an image (fast): the deploy fails before the seat
is powered, saying which store lacks it and what to share, not with an internal error.
Several hosts share the API's image directory until images are kept in Ceph (issue 17)."""
from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from labmetal.conductor.agent_steps import DeployError
from labmetal.conductor.deploy import DISK_IMAGE_KINDS, DeployContext
from labmetal.config import Settings
from labmetal.db import Database
from labmetal.images.store import ImageStore
from labmetal.models import Image
from labmetal.secrets import SecretBox

pytestmark = pytest.mark.fast


def test_an_image_stored_on_another_host_fails_the_deploy_clearly(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'ctx.db'}")
    db.upgrade()
    with db.write() as session:
        session.add(Image(name="debian12", kind="whole-disk", status="active"))
    settings = Settings(auth="noauth", state_dir=tmp_path)
    ctx = DeployContext(settings.deploy, db, SecretBox(Fernet.generate_key()), "host-b",
                        ImageStore(tmp_path / "images-of-host-b", 2**30))
    image = ctx.image("debian12", DISK_IMAGE_KINDS, "instance_info.image_source")
    with pytest.raises(DeployError, match="image debian12 is not in this conductor's image "
                                          "store .*images-of-host-b on host-b.*image_dir"):
        ctx.held_here(image)
    raw = ctx.store.raw_path(image.uuid)
    raw.parent.mkdir(parents=True)
    raw.write_bytes(b"\0" * 512)
    ctx.held_here(image)  # once the host holds it
