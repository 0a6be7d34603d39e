"""IPMI power with pyghmi, made safe to call from a conductor's worker pool.

pyghmi calls block and some never return (a BMC that stops answering in the middle of a
login), so every exchange runs in its own thread under a deadline. Calls to one BMC take
turns (BMCs handle few sessions), and a BMC whose last call is still hanging is refused at
once instead of collecting more stuck threads. Unanswered calls are retried with backoff;
authentication errors are not.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any, Callable

import pyghmi.ipmi.private.session as pyghmi_session
from pyghmi import exceptions as pyghmi_exceptions
from pyghmi.ipmi.command import Command

from labmetal import states
from labmetal.conductor.power.base import (AuthenticationFailed, BmcUnreachable, Field,
                                           PowerError, PowerInterface, PowerTarget)

LOG = logging.getLogger(__name__)

NO_ANSWER = "no answer"
AUTH_ERRORS = ("incorrect password", "unauthorized name", "insufficient privilege",
               "invalid role", "unauthorized")


_prepared = threading.Lock()
POLL_SLICE = 0.01


_pyghmi_io_wait = pyghmi_session._io_wait


def _io_wait_in_slices(timeout: float, myaddr: Any = None, evq: Any = None) -> None:
    """pyghmi's waiters check for a packet, then ask its I/O thread to wake them when one
    comes; a packet that lands in between wakes no one, and the caller sleeps its whole
    retransmit timer (0.5-1 s per exchange, seen here on most calls under load). Every
    caller of _io_wait loops until its answer or deadline, so capping each wait bounds that
    loss to POLL_SLICE."""
    _pyghmi_io_wait(min(timeout, POLL_SLICE), myaddr, evq)


def prepare_pyghmi() -> None:
    """Make pyghmi's client safe for a conductor's many threads, once per process.

    Besides the waits above and the locks below: pyghmi starts its I/O thread on first use and
    wakes it by a
    packet only once the thread has published a select deadline; a caller that queues work
    before that is not woken and waits for the thread's 300 s select timeout (the "hangs
    forever" of DESIGN §9). Start the thread here and wait until it is in its loop.
    """
    with _prepared:
        pyghmi_session._io_wait = _io_wait_in_slices
        # Its two session-table locks are taken in both orders (send_payload holds the
        # keepalive lock and takes the waiting one; wait_for_rsp holds the waiting lock
        # while a timed-out session resends): under load threads deadlock for ever, and
        # every later call with them. One reentrant lock for both cannot deadlock.
        pyghmi_session.WAITING_SESSIONS = pyghmi_session.KEEPALIVE_SESSIONS
        if pyghmi_session.iothread is None:
            pyghmi_session.Session._assignsocket()
        give_up = time.monotonic() + 5
        while pyghmi_session.selectdeadline <= 0 and time.monotonic() < give_up:
            time.sleep(0.001)


class IpmiPower(PowerInterface):
    name = "ipmi"
    fields = {
        "ipmi_address": Field("IP address or host name of the node's BMC.", required=True,
                              kind="host"),
        "ipmi_port": Field("UDP port of the BMC. Default 623.", default=623, kind="port"),
        "ipmi_username": Field("BMC user name. Default: none (anonymous).", default=""),
        "ipmi_password": Field("BMC password. Stored sealed, never shown.", default=""),
    }

    def __init__(self, deadline: float = 15.0, attempt_timeout: float = 6.0, retries: int = 2,
                 state_change_timeout: float = 60.0):
        self.deadline = deadline
        self.attempt_timeout = attempt_timeout
        self.retries = retries
        self.state_change_timeout = state_change_timeout
        self._guard = threading.Lock()
        self._bmc_locks: dict[tuple[str, int], threading.Lock] = {}
        self._hanging: dict[tuple[str, int], threading.Thread] = {}
        prepare_pyghmi()

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
        pyghmi_device = {"pxe": "network", "disk": "hd"}[device]
        self._call(self.parse(target.info),
                   lambda cmd: cmd.set_bootdev(pyghmi_device, persist=True))

    # -- helpers ---------------------------------------------------------------------
    def _read_state(self, info: dict[str, Any]) -> str:
        result = self._call(info, lambda cmd: cmd.get_power())
        return states.POWER_ON if result.get("powerstate") == "on" else states.POWER_OFF

    def _change(self, info: dict[str, Any], directive: str, expected: str) -> str:
        """Send the chassis command, then poll (each poll its own short exchange) until
        the machine reports the expected state."""
        self._call(info, lambda cmd: cmd.set_power(directive, wait=False))
        give_up = time.monotonic() + self.state_change_timeout
        delay = 0.05
        while True:
            current = self._read_state(info)
            if current == expected:
                return current
            if time.monotonic() >= give_up:
                raise PowerError(f"BMC {self._where(info)} accepted '{directive}' but the machine "
                                 f"is still '{current}' after {self.state_change_timeout:.0f} s")
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    @staticmethod
    def _where(info: dict[str, Any]) -> str:
        return f"{info['ipmi_address']}:{info['ipmi_port']}"

    def _lock_for(self, key: tuple[str, int]) -> threading.Lock:
        with self._guard:
            return self._bmc_locks.setdefault(key, threading.Lock())

    def _call(self, info: dict[str, Any], operation: Callable[[Command], Any]) -> Any:
        key = (info["ipmi_address"], info["ipmi_port"])
        where = self._where(info)
        give_up = time.monotonic() + self.deadline
        lock = self._lock_for(key)
        if not lock.acquire(timeout=self.deadline):
            raise BmcUnreachable(f"BMC {where} is busy: another call has not finished in "
                                 f"{self.deadline:.0f} s")
        try:
            hanging = self._hanging.get(key)
            if hanging is not None and hanging.is_alive():
                raise BmcUnreachable(f"BMC {where} did not answer: an earlier call to it is "
                                     "still waiting")
            self._hanging.pop(key, None)
            attempt, backoff = 0, 0.5
            while True:
                attempt += 1
                remaining = give_up - time.monotonic()
                try:
                    return self._attempt(key, info, operation, min(self.attempt_timeout, remaining))
                except BmcUnreachable as error:
                    remaining = give_up - time.monotonic()
                    if attempt > self.retries or remaining <= backoff:
                        detail = "" if str(error) == NO_ANSWER else f"; last error: {error}"
                        raise BmcUnreachable(
                            f"BMC {where} did not answer (gave up after {attempt} attempt(s), "
                            f"{self.deadline - max(remaining, 0):.1f} s{detail})") from None
                    time.sleep(backoff)
                    backoff *= 2
        finally:
            lock.release()

    def _attempt(self, key: tuple[str, int], info: dict[str, Any],
                 operation: Callable[[Command], Any], timeout: float) -> Any:
        outcome: dict[str, Any] = {}
        finished = threading.Event()

        def exchange() -> None:
            try:
                command = Command(bmc=info["ipmi_address"], port=info["ipmi_port"],
                                  userid=info["ipmi_username"].encode(),  # bytes: see DESIGN §9
                                  password=info["ipmi_password"].encode(), keepalive=False)
                try:
                    outcome["value"] = operation(command)
                finally:
                    command.ipmi_session.logout()
            except BaseException as error:  # handed to the waiting caller
                outcome["error"] = error
            finally:
                finished.set()

        worker = threading.Thread(target=exchange, daemon=True, name=f"ipmi {key[0]}:{key[1]}")
        worker.start()
        if not finished.wait(max(timeout, 0.1)):
            self._hanging[key] = worker
            raise BmcUnreachable(NO_ANSWER)
        if "error" in outcome:
            raise self._translate(outcome["error"], self._where(info))
        return outcome.get("value")

    @staticmethod
    def _translate(error: BaseException, where: str) -> Exception:
        if isinstance(error, socket.gaierror):
            return PowerError(f"cannot resolve BMC address {where}: {error}")
        if isinstance(error, OSError):
            return BmcUnreachable(str(error))
        if isinstance(error, pyghmi_exceptions.IpmiException):
            text = str(error.args[0]) if error.args and error.args[0] else ""
            if any(word in text.lower() for word in AUTH_ERRORS):
                return AuthenticationFailed(f"IPMI authentication failed at BMC {where}: {text}")
            if not text or "timeout" in text.lower() or "session" in text.lower():
                return BmcUnreachable(NO_ANSWER)
            return PowerError(f"BMC {where} refused the request: {text}")
        if isinstance(error, PowerError):
            return error
        # pyghmi's shared session tables still race now and then under many threads
        # (a KeyError on its handler map, seen once in 3000 logins): worth another attempt.
        return BmcUnreachable(f"IPMI client error {type(error).__name__}: {error}")
