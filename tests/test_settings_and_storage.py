"""Settings sources, sealed credentials and the migrated schema."""
import dataclasses

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from labmetal.config import BORROWED, GROUPS, Settings, load_settings
from labmetal.db import Database
from labmetal.models import Base
from labmetal.secrets import MASK, SecretBox, masked

pytestmark = pytest.mark.fast


def test_command_line_beats_environment_beats_file(tmp_path):
    config = tmp_path / "labmetal.toml"
    config.write_text('[labmetal]\nlisten = "127.0.0.1:7000"\nauth = "http_basic"\n'
                      'power_sync_interval = 30\n')
    env = {"LABMETAL_LISTEN": "127.0.0.1:7001"}
    settings = load_settings({"listen": None}, config_file=config, environ=env)
    assert (settings.listen, settings.auth, settings.power_sync_interval) == (
        "127.0.0.1:7001", "http_basic", 30.0)
    assert load_settings({"listen": "127.0.0.1:7002"}, config, env).listen == "127.0.0.1:7002"


def test_config_file_typos_are_errors(tmp_path):
    config = tmp_path / "labmetal.toml"
    config.write_text('[labmetal]\nlistenn = "127.0.0.1:7000"\n')
    with pytest.raises(ValueError, match="unknown settings.*listenn"):
        load_settings({}, config_file=config, environ={})
    with pytest.raises(ValueError, match="auth must be"):
        load_settings({"auth": "keystone"}, environ={})



def test_every_setting_has_one_home_group_and_the_groups_carry_its_value(tmp_path):
    """One flat record is loaded; each part receives its group. A new setting must be
    placed in exactly one group (borrowed fields are another group's)."""
    homes: dict[str, list[str]] = {}
    for name, kind in GROUPS.items():
        for f in dataclasses.fields(kind):
            if f.metadata != BORROWED:
                homes.setdefault(f.name, []).append(name)
    names = [f.name for f in dataclasses.fields(Settings)]
    assert {name: homes.get(name, []) for name in names
            if len(homes.get(name, [])) != 1} == {}
    assert sorted(set(homes) - set(names)) == []  # a group's own field is a setting
    config = tmp_path / "labmetal.toml"
    config.write_text('[labmetal]\nipmi_packet_timeout = 5\nldap_timeout = 2\n'
                      'multicast_ttl = 4\noverlay_backend = "ceph"\n')
    settings = load_settings({"state_dir": str(tmp_path), "seat_url": "http://10.9.0.1:80/"},
                             config_file=config,
                             environ={"LABMETAL_DHCP_MODE": "proxy", "LABMETAL_AUTH": "noauth"})
    for name, kind in GROUPS.items():
        group = getattr(settings, name)
        assert type(group) is kind
        for f in dataclasses.fields(kind):  # borrowed derived values too (seat_base_url)
            assert getattr(group, f.name) == getattr(settings, f.name), (name, f.name)
    assert (settings.power.ipmi_packet_timeout, settings.directory.ldap_timeout,
            settings.room_jobs.multicast_ttl, settings.session_store.overlay_backend,
            settings.boot.dhcp_mode, settings.access.auth) == (5, 2.0, 4, "ceph", "proxy",
                                                              "noauth")
    assert settings.boot.seat_base_url == settings.seat_base_url == "http://10.9.0.1:80"
    assert settings.images.image_path == settings.image_path == tmp_path / "images"
    assert settings.session_store.overlay_path == tmp_path / "overlays"
    assert settings.session_store.iscsi_portal_host_port == ("10.9.0.1", 3260)
    assert settings.service.database_url == f"sqlite:///{tmp_path / 'labmetal.db'}"

def test_credentials_are_sealed_and_masked(tmp_path):
    box = SecretBox.from_file(tmp_path / "key")
    assert (tmp_path / "key").stat().st_mode & 0o777 == 0o600
    stored = box.seal_changed({"ipmi_address": "10.0.0.5", "ipmi_password": "hunter2"}, {})
    assert stored["ipmi_address"] == "10.0.0.5"
    assert "hunter2" not in str(stored)
    assert box.open_all(stored)["ipmi_password"] == "hunter2"
    assert masked(stored)["ipmi_password"] == MASK
    # unchanged values are not sealed twice; a changed one is sealed again
    assert box.seal_changed(dict(stored), stored) == stored
    other = SecretBox.from_file(tmp_path / "other-key")
    with pytest.raises(ValueError, match="cannot be decrypted"):
        other.open(stored["ipmi_password"])


def test_migrations_build_exactly_the_models_schema(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'schema.db'}")
    db.upgrade()
    db.upgrade()  # idempotent
    with db.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []


def test_a_retired_setting_in_the_config_file_is_a_warning_and_a_typo_an_error(
        tmp_path, caplog) -> None:
    """An upgrade must not stop a lab's service over a setting it no longer reads."""
    config = tmp_path / "labmetal.toml"
    config.write_text('[labmetal]\nipmi_retries = 2\nipmi_attempt_timeout = 6.0\n')
    with caplog.at_level("WARNING"):
        settings = load_settings({"state_dir": str(tmp_path)}, config_file=config, environ={})
    assert settings.power.ipmi_deadline == 15.0
    assert "setting ipmi_retries is no longer used" in caplog.text
    config.write_text('[labmetal]\nipmi_retrys = 2\n')
    with pytest.raises(ValueError, match="unknown settings in .*: ipmi_retrys"):
        load_settings({"state_dir": str(tmp_path)}, config_file=config, environ={})
