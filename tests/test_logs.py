"""The log filters (labmetal/logs.py): huge values cannot freeze the secret redaction, and a
flood of one message from the seats' loggers is cut to a few lines that say so (the
services under hostile input: tests/test_hostile_input.py)."""
from __future__ import annotations

import io
import logging
import threading
import time

import pytest

from labmetal.logs import MAX_MESSAGE, RateLimit, RedactSecrets

pytestmark = pytest.mark.fast

WAIT = 60  # seconds: the bound of every wait; a frozen filter takes minutes


def set_by(event: threading.Event, deadline: float) -> bool:
    """Whether ``event`` is set by ``deadline`` (``time.monotonic()``). A thread stuck in a
    regular expression holds the GIL: this thread cannot even start waiting before the
    expression ends, and then finds the event set; hence the deadline, taken before the
    other thread is let go, is checked as well."""
    return event.wait(max(0.0, deadline - time.monotonic())) and time.monotonic() <= deadline


def test_a_huge_file_name_or_word_cannot_freeze_the_log_filter():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactSecrets())
    logger = logging.getLogger("tests.hostile_input")
    logger.addHandler(handler)
    logger.propagate = False
    name, word = "a" * 65_000, "b" * 1_000_000
    named, go_on, worded = threading.Event(), threading.Event(), threading.Event()

    def log() -> None:
        logger.warning("refused %r from %s: outside the TFTP root", name, "10.99.1.23")
        named.set()
        if not go_on.wait(WAIT):  # the first step froze: do not start the next one
            return
        logger.warning('"password": "hunter2", agent_token=%s, X-Auth-Token: %s, ' + word,
                       "t0ken-1", "t0ken-2")
        logger.warning("unhandled error on POST /v1/heartbeat/%s", word + "/chap_secret=s3")
        try:
            raise ValueError("chap_secret='s3cr3t' " + word)
        except ValueError:
            logger.exception("heartbeat failed")
        worded.set()

    thread = threading.Thread(target=log, name="hostile-log", daemon=True)
    deadline = time.monotonic() + WAIT
    thread.start()
    try:
        assert set_by(named, deadline), "logging a 65,000-character file name froze"
        deadline = time.monotonic() + WAIT
        go_on.set()  # (not after a freeze: the thread would hold the GIL for hours)
        assert set_by(worded, deadline), "logging a 1 MB word froze"
    finally:
        logger.removeHandler(handler)
    output = stream.getvalue()
    lines = output.splitlines()
    assert all(len(line) <= MAX_MESSAGE + 100 for line in lines)
    assert len(output) < 10 * MAX_MESSAGE
    # A long value is cut where it stands: the rest of its line is still there.
    assert lines[0].startswith("refused 'aaa") and lines[0].endswith(
        "more characters]' from 10.99.1.23: outside the TFTP root")
    assert "more characters]" in lines[1] and "more characters]" in lines[2]
    assert lines[1].startswith('"password": "******", agent_token=******, X-Auth-Token: ******')
    assert "ValueError: chap_secret='******' bbb" in output
    for secret in ("hunter2", "t0ken-1", "t0ken-2", "s3cr3t"):
        assert secret not in output


def test_a_flood_of_one_message_from_the_seat_loggers_writes_a_few_lines_and_says_so():
    """One line per packet, 10,000 packets: 20 lines of each message per minute pass, to
    every handler alike; the first line of the next minute says how many were dropped.
    Other loggers are never limited."""
    now = [1000.0]
    flood = RateLimit(burst=20, window=60, clock=lambda: now[0])
    streams = [io.StringIO(), io.StringIO()]
    tftp = logging.getLogger("tftpy.TftpServer.hostile-test")
    mine = logging.getLogger("labmetal.conductor.hostile-test")
    for logger in (tftp, mine):
        logger.propagate = False
        for stream in streams:
            handler = logging.StreamHandler(stream)
            handler.addFilter(flood)
            logger.addHandler(handler)
    try:
        for n in range(10_000):
            tftp.error("Fatal exception thrown from session %s: %s", f"10.99.1.{n % 250}",
                       "File not found")
            tftp.error("Timeout waiting for traffic")
        for n in range(100):
            mine.warning("node %d is off", n)
        now[0] += 61
        tftp.error("Fatal exception thrown from session %s: %s", "10.99.1.7", "x")
    finally:
        for logger in (tftp, mine):
            logger.handlers.clear()
    for stream in streams:
        lines = stream.getvalue().splitlines()
        assert sum("Fatal exception" in line for line in lines) == 21
        assert sum("Timeout waiting" in line for line in lines) == 20
        assert sum("is off" in line for line in lines) == 100
        assert lines[-1] == ("Fatal exception thrown from session 10.99.1.7: x "
                             "[9980 more like this dropped in 60 s]")

