"""One child process kept running: started, watched, started again after a pause when it
dies, and stopped for good on request.

labmetal runs two such children for its whole life, dnsmasq (DHCP for the room,
pxe/dnsmasq.py) and nginx (the front, labmetal/front.py). A child that crashes must not
leave a room without DHCP or the API without its front until someone restarts labmetal, and
a stop must not race a restart into a child nobody will stop. Both rules live here once.
"""
from __future__ import annotations

import logging
import signal
import subprocess
import threading
from typing import Callable

LOG = logging.getLogger(__name__)


class Respawner:
    """``spawn`` starts the child and returns it; ``reap`` runs after each exit, before a
    restart (nginx: kill what is left of its process group)."""

    def __init__(self, name: str, spawn: Callable[[], subprocess.Popen],
                 restart_delay: float = 1.0,
                 reap: Callable[[subprocess.Popen], None] = lambda process: None):
        self.name = name
        self.restart_delay = restart_delay
        self.restarts = 0
        self.stopping = threading.Event()
        self._spawn = spawn
        self._reap = reap
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._watcher: threading.Thread | None = None

    @property
    def process(self) -> subprocess.Popen | None:
        return self._process

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def start(self) -> subprocess.Popen:
        """The first start; :meth:`watch` then keeps it running (a caller may check the
        child is ready in between)."""
        with self._lock:
            self._process = self._spawn()
            return self._process

    def watch(self) -> None:
        self._watcher = threading.Thread(target=self._watch, name=self.name, daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while not self.stopping.is_set():
            process = self._process
            assert process is not None
            code = process.wait()
            self._reap(process)
            with self._lock:
                if self.stopping.is_set():
                    return
                LOG.error("%s (pid %s) exited with %s; starting it again", self.name,
                          process.pid, code)
                self.restarts += 1
            if self.stopping.wait(self.restart_delay):
                return
            with self._lock:
                if not self.stopping.is_set():
                    self._process = self._spawn()

    def send(self, signum: signal.Signals) -> None:
        """Signal the running child (SIGHUP: re-read your files); nothing if it is down."""
        with self._lock:
            process = self._process
            if process is not None and process.poll() is None:
                process.send_signal(signum)

    def stop(self, timeout: float = 10) -> subprocess.Popen | None:
        """Stop for good: no restart after this. Returns the last child, ended."""
        with self._lock:
            self.stopping.set()
            process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        if self._watcher is not None:
            self._watcher.join(timeout)
        return process
