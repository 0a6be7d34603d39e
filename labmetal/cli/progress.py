"""A transfer's progress as `labmetal` shows it on standard error: a live bar on a terminal,
one summary line otherwise (so that logs stay readable). Uploads, captures and downloads
share it."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TextIO


@dataclass
class Progress:
    name: str
    total: int
    out: TextIO
    sent: int = 0
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None  # the last byte sent; the server then checks and converts
    drawn_at: float = 0.0
    verb: str = "upload"  # what is shown: "upload", "capture", "download"

    @property
    def live(self) -> bool:
        return self.out.isatty()

    def add(self, count: int) -> None:
        self.sent += count
        now = time.monotonic()
        if self.live and (now - self.drawn_at >= 0.2 or self.sent == self.total):
            self.drawn_at = now
            percent = 100 * self.sent / self.total if self.total else 100.0
            self.out.write(f"\r{self.verb} {self.name}: {percent:5.1f}% "
                           f"{self.sent / 1e6:.1f}/{self.total / 1e6:.1f} MB "
                           f"{self.rate():.1f} MB/s\x1b[K")
            self.out.flush()

    def elapsed(self) -> float:
        return max((self.ended or time.monotonic()) - self.started, 1e-6)

    def rate(self) -> float:
        return self.sent / 1e6 / self.elapsed()

    def finish(self) -> None:
        if self.live:
            self.out.write("\n")
        past = self.verb + ("d" if self.verb.endswith("e") else "ed")
        self.out.write(f"{past} {self.name}: {self.sent / 1e6:.1f} MB in "
                       f"{self.elapsed():.1f} s ({self.rate():.1f} MB/s), active after "
                       f"{time.monotonic() - self.started:.1f} s\n")
        self.out.flush()


class DownloadProgress(Progress):
    """The upload bar, for a download: from its first byte (the server copies the disk before
    it sends any), then one summary line."""

    def waiting(self) -> None:
        if self.live:
            self.out.write(f"\r{self.verb} {self.name}: the server is copying the disk\x1b[K")
            self.out.flush()

    def update(self, received: int, total: int | None) -> None:
        if self.sent == 0:
            self.started = self.drawn_at = time.monotonic()  # a rate needs some time
            self.total = total or 0
        self.add(received - self.sent)

    def finish(self) -> None:
        self.ended = time.monotonic()
        if self.live:
            self.out.write("\n")
        self.out.write(f"downloaded {self.name}: {self.sent / 1e6:.1f} MB in "
                       f"{self.elapsed():.1f} s ({self.rate():.1f} MB/s)\n")
        self.out.flush()
