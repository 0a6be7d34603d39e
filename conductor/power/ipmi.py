"""IPMI power: each call one RMCP+ session of its own (conductor/power/rmcp.py), under the
call's deadline, run by the calling thread.

Calls to one BMC take turns (BMCs hold few sessions, and two logins at once from one
conductor only slow each other). Every packet is resent with backoff until the deadline,
so a lossy network costs time, not the call; a BMC that answered nothing in the whole
call is told apart from one whose answers the network lost (BmcUnreachable.silent), and
only the first counts toward putting a node in maintenance (conductor/service.py).
"""
from __future__ import annotations

import socket
import threading
import time
from typing import Any, Callable

from labmetal import states
from labmetal.conductor.power import rmcp
from labmetal.conductor.power.base import (AuthenticationFailed, BmcUnreachable, Field,
                                           PowerError, PowerInterface, PowerTarget)

CHASSIS = 0x00
GET_CHASSIS_STATUS, CHASSIS_CONTROL, SET_BOOT_OPTIONS = 0x01, 0x02, 0x08
CONTROL = {"off": 0, "on": 1, "reset": 3, "shutdown": 5}
BOOT_DEVICE = {"pxe": 0x04, "disk": 0x08}
BOOT_FLAGS_VALID_PERSISTENT = 0x80 | 0x40


class IpmiPower(PowerInterface):
    name = "ipmi"
    fields = {
        "ipmi_address": Field("IP address or host name of the node's BMC.", required=True,
                              kind="host"),
        "ipmi_port": Field("UDP port of the BMC. Default 623.", default=623, kind="port"),
        "ipmi_username": Field("BMC user name. Default: none (anonymous).", default=""),
        "ipmi_password": Field("BMC password. Stored sealed, never shown.", default=""),
    }

    def __init__(self, deadline: float = 15.0, packet_timeout: float = 2.0,
                 state_change_timeout: float = 60.0):
        self.deadline = deadline
        self.timing = rmcp.Timing(max_wait=packet_timeout)
        self.state_change_timeout = state_change_timeout
        self._guard = threading.Lock()
        self._bmc_locks: dict[tuple[str, int], threading.Lock] = {}

    # -- the interface ---------------------------------------------------------------
    def get_power_state(self, target: PowerTarget) -> str:
        return self._read_state(self.parse(target.info))

    def set_power_state(self, target: PowerTarget, state: str) -> str:
        info = self.parse(target.info)
        if state == states.POWER_ON:
            return self._change(info, "on", states.POWER_ON)
        if state == states.POWER_OFF:
            return self._change(info, "off", states.POWER_OFF)
        if state == states.SOFT_POWER_OFF:
            return self._change(info, "shutdown", states.POWER_OFF)
        if state == states.REBOOTING:
            return self._change(info, "boot", states.POWER_ON)
        if state == states.SOFT_REBOOTING:
            self._change(info, "shutdown", states.POWER_OFF)
            return self._change(info, "on", states.POWER_ON)
        raise PowerError(f"unsupported power target {state!r}")

    def set_boot_device(self, target: PowerTarget, device: str) -> None:
        """Set System Boot Options: acknowledge the BIOS's boot info (parameter 3), then
        the boot flags (parameter 5), valid and persistent."""
        flags = bytes([5, BOOT_FLAGS_VALID_PERSISTENT, BOOT_DEVICE[device], 0, 0, 0])

        def operation(session: rmcp.RmcpSession) -> None:
            session.command(CHASSIS, SET_BOOT_OPTIONS, bytes([3, 8]))
            session.command(CHASSIS, SET_BOOT_OPTIONS, flags)

        self._call(self.parse(target.info), operation)

    # -- helpers ---------------------------------------------------------------------
    @staticmethod
    def _power_is_on(session: rmcp.RmcpSession) -> bool:
        status = session.command(CHASSIS, GET_CHASSIS_STATUS)
        if not status:
            raise rmcp.Refused("the chassis status answer is empty")
        return bool(status[0] & 0x01)

    def _read_state(self, info: dict[str, Any]) -> str:
        on = self._call(info, self._power_is_on)
        return states.POWER_ON if on else states.POWER_OFF

    def _change(self, info: dict[str, Any], directive: str, expected: str) -> str:
        """Send the chassis control, then poll (each poll its own short call) until the
        machine reports the expected state. "boot" is a power-on for a machine that is off
        and a reset for one that is on."""
        def control(session: rmcp.RmcpSession) -> None:
            action = directive
            if directive == "boot":
                action = "reset" if self._power_is_on(session) else "on"
            session.command(CHASSIS, CHASSIS_CONTROL, bytes([CONTROL[action]]))

        give_up = time.monotonic() + self.state_change_timeout
        self._lossy(give_up, lambda: self._call(info, control))
        delay = 0.05
        while True:
            current = self._lossy(give_up, lambda: self._read_state(info))
            if current == expected:
                return current
            if time.monotonic() >= give_up:
                raise PowerError(f"BMC {self._where(info)} accepted '{directive}' but the machine "
                                 f"is still '{current}' after {self.state_change_timeout:.0f} s")
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def _lossy(self, give_up: float, call: Callable[[], Any]) -> Any:
        """A call of a power action, made again while the action's time lasts when the BMC
        answered but the network lost too much: a lossy network costs the action time, not
        its result. A silent BMC fails it at once."""
        while True:
            try:
                return call()
            except BmcUnreachable as error:
                if error.silent or time.monotonic() + self.deadline > give_up:
                    raise

    @staticmethod
    def _where(info: dict[str, Any]) -> str:
        return f"{info['ipmi_address']}:{info['ipmi_port']}"

    def _lock_for(self, key: tuple[str, int]) -> threading.Lock:
        with self._guard:
            return self._bmc_locks.setdefault(key, threading.Lock())

    def _call(self, info: dict[str, Any], operation: Callable[[rmcp.RmcpSession], Any]) -> Any:
        where = self._where(info)
        deadline = time.monotonic() + self.deadline
        lock = self._lock_for((info["ipmi_address"], info["ipmi_port"]))
        if not lock.acquire(timeout=self.deadline):
            raise BmcUnreachable(f"BMC {where} is busy: another call to it has not finished "
                                 f"in {self.deadline:.0f} s", silent=False)
        try:
            # bytes: the BMC compares them as such; a name or password is not text to it
            return rmcp.call(info["ipmi_address"], info["ipmi_port"],
                             info["ipmi_username"].encode(), info["ipmi_password"].encode(),
                             deadline, operation, self.timing)
        except socket.gaierror as error:
            raise PowerError(f"cannot resolve BMC address {where}: {error}") from None
        except rmcp.NoAnswer as error:
            raise BmcUnreachable(f"{error} (deadline {self.deadline:.0f} s)",
                                 silent=error.answered == 0) from None
        except rmcp.AuthRefused as error:
            raise AuthenticationFailed(f"IPMI authentication failed at BMC {where}: "
                                       f"{error}") from None
        except rmcp.RmcpError as error:
            raise PowerError(f"BMC {where} refused the request: {error}") from None
        finally:
            lock.release()
