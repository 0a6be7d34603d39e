"""The moment between a verified write and the node's "active" (fast): the conductor asks
the seat's BMC for a reboot before it commits "active", and a PC that PXE-boots quickly
asks for its script in between. The script is already its disk; a node still waiting for
its write gets the ramdisk. (Seen for real: 1 deploy in 6 of tests/test_deploy.py's first
test booted the deploy ramdisk again and sat there, its node active.) The application as
`labmetal api` builds it, on a real SQLite database."""
from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from labmetal import states
from labmetal.api.app import Services, create_app
from labmetal.config import Settings
from labmetal.db import Database
from labmetal.models import Node, Port
from labmetal.secrets import SecretBox

pytestmark = pytest.mark.fast


def test_a_seat_rebooted_after_its_verified_write_is_sent_to_its_disk(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'boot.db'}")
    db.upgrade()
    with db.write() as session:
        for name, step, mac in (("pc1", {"step": "write image", "id": "x"}, "52:54:00:aa:00:01"),
                                ("pc2", {"step": states.BOOT_WRITTEN_DISK}, "52:54:00:aa:00:02")):
            node = Node(name=name, driver="ipmi", provision_state=states.DEPLOYING,
                        deploy_step=step, driver_info={"deploy_kernel": "dk",
                                                       "deploy_ramdisk": "dr"})
            session.add(node)
            session.flush()
            session.add(Port(address=mac, node_id=node.id, pxe_enabled=True))
    settings = Settings(auth="noauth", state_dir=tmp_path)
    client = create_app(Services(settings, db, None, None, {},
                                 SecretBox(Fernet.generate_key()))).test_client()

    writing = client.get("/boot/52-54-00-aa-00-01.ipxe").get_data(as_text=True)
    assert "needs a deploy kernel and ramdisk" in writing  # the ramdisk, were they uploaded
    booting = client.get("/boot/52-54-00-aa-00-02.ipxe").get_data(as_text=True)
    assert "sanboot --no-describe --drive 0x80" in booting
    assert "labmetal.mode" not in booting
