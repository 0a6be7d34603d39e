"""What a virtual BMC or WoL listener switches on and off: a seat of the simulated lab.

Only the in-memory machine exists for now; QEMU guests and agent seats implement the same
small interface later.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Protocol


class Machine(Protocol):
    name: str

    def is_on(self) -> bool: ...
    def power_on(self) -> None: ...
    def power_off(self) -> None: ...
    def reset(self) -> None: ...
    def get_boot_device(self) -> str: ...
    def set_boot_device(self, device: str) -> None: ...


@dataclass
class MemoryMachine:
    """A machine that only remembers its power state. ``power_delay`` makes a power change
    take effect that many seconds after it was asked for, as on real PCs, without holding
    up the BMC's answers."""
    name: str
    power_delay: float = 0.0
    boot_device: str = "default"
    events: list[tuple[float, str]] = field(default_factory=list)
    _on: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _generation: int = 0

    def is_on(self) -> bool:
        return self._on

    def _set(self, on: bool, event: str) -> None:
        with self._lock:
            self._generation += 1
            generation = self._generation
            self.events.append((time.time(), event))

        def apply() -> None:
            with self._lock:
                if generation == self._generation:  # a later request wins
                    self._on = on

        if self.power_delay > 0:
            timer = threading.Timer(self.power_delay, apply)
            timer.daemon = True
            timer.start()
        else:
            apply()

    def power_on(self) -> None:
        self._set(True, "power on")

    def power_off(self) -> None:
        self._set(False, "power off")

    def reset(self) -> None:
        self._set(True, "reset")

    def get_boot_device(self) -> str:
        return self.boot_device

    def set_boot_device(self, device: str) -> None:
        self.boot_device = device
        self.events.append((time.time(), f"boot device {device}"))
