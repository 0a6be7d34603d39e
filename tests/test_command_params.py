"""The agent's command params: the conductor builds them, the agent reads the same JSON back
with the same class, and wrong params are turned down with the command and field named.
(Fast: pure code. The agent running them: tests/test_agent.py, tests/test_delta.py.)"""
from __future__ import annotations

import json

import pytest

from labmetal.agent import command_params as cp
from labmetal.agent import proof

pytestmark = pytest.mark.fast

GROUP = {"group": "239.255.77.1", "port": 47000, "sender": "10.99.1.1:47001",
         "interface": "10.99.1.1", "job": 7}


@pytest.mark.parametrize("params", [
    cp.WriteImage("http://c/m", "http://c/p"),
    cp.WriteImage("http://c/m", "http://c/p", delta=False, readback=True,
                  multicast=cp.MulticastGroup.from_dict(GROUP)),
    cp.DeployPartitionImage("http://c/m", "http://c/p", boot_mode="uefi"),
    cp.InstallBootloader("http://c/k", "http://c/r", "quiet"),
    cp.ExportIscsi(iqn="iqn.2026-11.org.labmetal:x", port=3261,
                   allowed_initiators=("10.0.0.0/24",)),
    cp.UnexportIscsi(iqn="iqn.2026-11.org.labmetal:x"),
    cp.WipeMetadata(), cp.PowerOff(), cp.Reboot(),
    cp.ProveDisk(proof.challenge(64 * 1024 * 1024)),
], ids=lambda params: params.command)
def test_what_the_conductor_sends_the_agent_reads_back_the_same(params):
    wire = json.loads(json.dumps({"name": params.command, "params": params.to_dict()}))
    kind = cp.COMMANDS[wire["name"]]
    assert kind.from_dict(wire["params"]) == params
    assert not cp.missing(kind.required, wire["params"])


def test_the_json_is_the_one_the_agent_always_took():
    sent = cp.WriteImage("http://c/m", "http://c/p",
                         multicast=cp.MulticastGroup.from_dict(GROUP)).to_dict()
    assert sent["multicast"] == GROUP
    assert {key: sent[key] for key in ("manifest_url", "packed_url")} == {
        "manifest_url": "http://c/m", "packed_url": "http://c/p"}
    assert "multicast" not in cp.WriteImage("m", "p").to_dict()  # unset: not sent
    assert cp.ExportIscsi(iqn="iqn.x").to_dict() == {"iqn": "iqn.x", "port": 3260}
    # keys a command does not know are left alone (a newer conductor may send more)
    assert cp.InstallBootloader.from_dict({"kernel_url": "k", "ramdisk_url": "r",
                                           "later": 1}).kernel_cmdline == ""


@pytest.mark.parametrize("kind,data,words", [
    (cp.WriteImage, {"manifest_url": "m"}, "write_image needs param packed_url"),
    (cp.WriteImage, {"manifest_url": "m", "packed_url": "p", "delta": "no"},
     "write_image: delta must be true or false, not 'no'"),
    (cp.WriteImage, {"manifest_url": "m", "packed_url": "p", "multicast": {**GROUP,
                                                                          "group": "10.0.0.1"}},
     "write_image: multicast: group must be an IPv4 multicast address"),
    (cp.WriteImage, {"manifest_url": "m", "packed_url": "p", "multicast": {**GROUP,
                                                                          "sender": "nowhere"}},
     "sender must be host:port"),
    (cp.DeployPartitionImage, {"manifest_url": "m", "packed_url": "p", "boot_mode": "efi"},
     "unknown boot_mode 'efi' (auto, bios or uefi)"),
    (cp.ExportIscsi, {"port": "3260"}, "export_iscsi: port must be an integer from 1 to 65535"),
    (cp.ExportIscsi, {"allowed_initiators": "10.0.0.1"}, "a list of non-empty strings"),
    (cp.ProveDisk, {"nonce": "00" * 32, "extents": [[-1, 4096]]}, "prove_disk: bad extent"),
    (cp.Reboot, ["not", "an", "object"], "reboot: params must be a JSON object"),
])
def test_wrong_params_are_refused_naming_the_command_and_the_field(kind, data, words):
    with pytest.raises(cp.ParamsError) as refused:
        kind.from_dict(data)
    assert words in str(refused.value)


def test_a_required_field_absent_or_empty_is_what_the_agent_refuses_outright():
    assert cp.missing(cp.WriteImage.required, {"manifest_url": "", "packed_url": "p"}) == [
        "manifest_url"]
    assert cp.missing(cp.ProveDisk.required, {}) == ["nonce", "extents"]
    assert cp.missing(cp.WipeMetadata.required, {}) == []
