"""The power interface every hardware type implements (after Ironic's drivers/base.py)."""
from __future__ import annotations

import abc
import ipaddress
from dataclasses import dataclass, field
from typing import Any


class PowerError(Exception):
    """A power action failed; the message goes to the node's last_error as is."""


class AuthenticationFailed(PowerError):
    pass


class BmcUnreachable(PowerError):
    """No answer in time. ``silent``: the BMC answered nothing at all (hung, or gone), as
    opposed to answers that a lossy network dropped; only silence is a fault of the node."""

    def __init__(self, message: str, silent: bool = True):
        super().__init__(message)
        self.silent = silent


class NotSupported(PowerError):
    pass


class InvalidDriverInfo(ValueError):
    def __init__(self, driver: str, missing: list[str] | None = None,
                 malformed: dict[str, str] | None = None):
        self.missing = sorted(missing or [])
        self.malformed = dict(sorted((malformed or {}).items()))
        parts = []
        if self.missing:
            parts.append("missing " + ", ".join(self.missing))
        if self.malformed:
            parts.append("malformed " + "; ".join(f"{k}: {why}"
                                                  for k, why in self.malformed.items()))
        super().__init__(f"driver_info for driver '{driver}' is invalid: " + " and ".join(parts))


@dataclass(frozen=True)
class Field:
    description: str
    required: bool = False
    default: Any = None
    kind: str = "str"  # str | port | host


@dataclass
class PowerTarget:
    """Everything a power call needs about one node, secrets already opened."""
    node_uuid: str
    info: dict[str, Any]
    macs: list[str] = field(default_factory=list)


def _check(kind: str, value: Any) -> tuple[Any, str | None]:
    if kind == "port":
        try:
            port = int(value)
        except (TypeError, ValueError):
            return None, f"expected a port number, got {value!r}"
        return (port, None) if 0 < port < 65536 else (None, f"port {port} is out of range 1-65535")
    if kind == "host":
        text = str(value).strip()
        if not text or any(c.isspace() for c in text) or "/" in text:
            return None, f"expected an IP address or host name, got {value!r}"
        try:
            ipaddress.ip_address(text)
        except ValueError:
            labels = text.rstrip(".").split(".")
            if not all(label and len(label) < 64 and label.replace("-", "").isalnum()
                       for label in labels):
                return None, f"expected an IP address or host name, got {value!r}"
        return text, None
    return ("" if value is None else str(value)), None


class PowerInterface(abc.ABC):
    name: str
    fields: dict[str, Field]
    # True when the hardware cannot tell its power state (Wake-on-LAN): the state shown is
    # the last one labmetal asked for.
    assumed_state = False

    def parse(self, info: dict[str, Any], require: bool = True) -> dict[str, Any]:
        """Typed values with defaults; raises InvalidDriverInfo naming every bad key."""
        missing, malformed, values = [], {}, {}
        for key, spec in self.fields.items():
            raw = info.get(key)
            if raw in (None, ""):
                if spec.required and require:
                    missing.append(key)
                values[key] = spec.default
                continue
            value, why = _check(spec.kind, raw)
            if why:
                malformed[key] = why
            values[key] = value
        if missing or malformed:
            raise InvalidDriverInfo(self.name, missing, malformed)
        return values

    def validate(self, target: PowerTarget) -> None:
        self.parse(target.info)

    @abc.abstractmethod
    def get_power_state(self, target: PowerTarget) -> str: ...

    @abc.abstractmethod
    def set_power_state(self, target: PowerTarget, state: str) -> str:
        """Carry out a power target (states.POWER_TARGETS); returns the resulting state."""

    def set_boot_device(self, target: PowerTarget, device: str) -> None:
        """Boot from "pxe" or "disk" next. Folded into the power interface: the BMC that
        switches the power also holds the boot order (Ironic's management interface)."""
        raise NotSupported(f"{self.name} cannot choose the boot device")

    def verify(self, target: PowerTarget) -> str | None:
        """Check that labmetal can drive this node's power; returns the state if known."""
        return self.get_power_state(target)
