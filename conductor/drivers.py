"""Hardware types: a name and a choice of interface implementations (Ironic's model)."""
from __future__ import annotations

from dataclasses import dataclass

from labmetal.config import PowerSettings
from labmetal.conductor.power.base import PowerInterface
from labmetal.conductor.power.ipmi import IpmiPower
from labmetal.conductor.power.wol import WolPower


@dataclass(frozen=True)
class HardwareType:
    name: str
    power: PowerInterface
    description: str


def load_drivers(power: PowerSettings) -> dict[str, HardwareType]:
    ipmi = IpmiPower(deadline=power.ipmi_deadline, packet_timeout=power.ipmi_packet_timeout)
    return {
        "ipmi": HardwareType("ipmi", ipmi,
                             "Power through the node's BMC over IPMI (RMCP+, cipher suite 3)."),
        "wol": HardwareType("wol", WolPower(),
                            "Power on by Wake-on-LAN; off in-band by the agent."),
    }
