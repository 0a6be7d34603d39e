"""Wake-on-LAN power: a magic packet to the node's MACs powers it on; nothing else is possible
out of band. The power state shown is the one labmetal last set (``assumed_state``); power
off and reboot go in-band through the deploy agent, and fail clearly where there is none."""
from __future__ import annotations

import wakeonlan

from labmetal import states
from labmetal.conductor.power.base import (Field, NotSupported, PowerError, PowerInterface,
                                           PowerTarget)

IN_BAND_ONLY = ("Wake-on-LAN can only power a node on; power off and reboot go in-band "
                "through the deploy agent, and no agent is running on this node")


class WolPower(PowerInterface):
    name = "wol"
    assumed_state = True
    fields = {
        "wol_host": Field("Where magic packets go: a broadcast address (default "
                          "255.255.255.255) or the node's address.", default="255.255.255.255",
                          kind="host"),
        "wol_port": Field("UDP port for magic packets. Default 9.", default=9, kind="port"),
    }

    def validate(self, target: PowerTarget) -> None:
        self.parse(target.info)
        if not target.macs:
            raise PowerError("Wake-on-LAN needs the node's MAC address: add a port "
                             "(baremetal port create <MAC> --node <node>)")

    def get_power_state(self, target: PowerTarget) -> str:
        raise NotSupported("Wake-on-LAN cannot read a node's power state")

    def verify(self, target: PowerTarget) -> str | None:
        self.validate(target)
        return None  # unknown until labmetal powers it on

    def set_boot_device(self, target: PowerTarget, device: str) -> None:
        """Nothing to do: a WoL seat boots from the network first, and its per-MAC iPXE
        script sends it to the ramdisk or to its disk according to its state."""

    def set_power_state(self, target: PowerTarget, state: str) -> str:
        if state != states.POWER_ON:
            raise NotSupported(IN_BAND_ONLY)
        self.validate(target)
        info = self.parse(target.info)
        try:
            wakeonlan.wake(*target.macs, host=info["wol_host"], port=info["wol_port"])
        except OSError as error:
            raise PowerError(f"cannot send the magic packet to {info['wol_host']}:"
                             f"{info['wol_port']}: {error}") from None
        return states.POWER_ON
