"""What a virtual BMC or WoL listener switches on and off: a seat of the simulated lab.

The in-memory machine is for BMC-only rooms; light seats (lab/seat.py) and QEMU seats
(lab/qemu_seat.py) are processes, powered through :class:`SeatPower`.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
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


class SeatPower:
    """The power side every seat process shares. Power changes run in the seat's own
    worker thread, in order: a BMC answers at once while the seat starts or stops (which
    may take seconds), as real hardware does. Subclasses start and stop the process."""

    def __init__(self, name: str, state_dir: str):
        self.name = name
        self.boot_device = "network"
        self._lock = threading.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"seat-{name}")
        Path(state_dir).mkdir(parents=True, exist_ok=True)
        self.console_log = Path(state_dir) / "console.log"

    def power_on(self) -> None:
        self._worker.submit(self._start)

    def power_off(self) -> None:
        self._worker.submit(self._stop)

    def reset(self) -> None:
        self._worker.submit(self._reset)

    def shutdown(self) -> None:
        """Stop the seat now and wait for it (when the lab itself stops)."""
        self._worker.shutdown(wait=True, cancel_futures=True)
        self._stop()

    def get_boot_device(self) -> str:
        return self.boot_device

    def set_boot_device(self, device: str) -> None:
        self.boot_device = device

    def _start(self) -> None:
        raise NotImplementedError

    def _stop(self) -> None:
        raise NotImplementedError

    def _reset(self) -> None:
        self._stop()
        self._start()
