"""Logging for every process, with a last line of defence against credentials in messages.

Log lines carry what clients sent: a TFTP file name, the path of an API request, the text of
an exception about them. Some clients are students who are root on their seat (DESIGN.md §11),
so what one log call can cost and carry is bounded:

- each string argument of a call is cut to ``MAX_VALUE`` characters, so one hostile value
  cannot push the rest of its line (who sent it) out;
- the message is cut to ``MAX_MESSAGE`` characters, and a traceback's lines and line count
  are bounded the same way, *before* anything else reads them;
- the redaction is one pass of a pattern that only starts at the beginning of a word and
  never backtracks into it, so its cost grows with the line's length, not its square. (The
  pattern it replaces tried every position of every word and rescanned the word from there:
  a 65,000-character TFTP file name held the GIL, and with it API, conductor and TFTP, for
  minutes.)

A cut is marked ``…[N more characters]``.

And what one sender can cost in lines is bounded too: the loggers that write a line per
packet or request from a seat (TFTP, boot scripts) pass at most ``FLOOD_BURST`` lines of one
message (its format, not its values) per ``FLOOD_WINDOW`` seconds; the next line that passes
says how many were dropped. A seat flooding TFTP wrote 1,100 lines a second before.
"""
from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

MAX_VALUE = 2000
MAX_MESSAGE = 8000
MAX_TRACEBACK_LINES = 200  # the first and last half of a longer traceback are kept
FLOOD_BURST = 20
FLOOD_WINDOW = 60.0
# Loggers that write a line per seat packet or request: tftpy's, labmetal's TFTP front and
# the boot scripts' refusals.
FLOOD_LOGGERS = ("tftpy", "labmetal.pxe.tftp", "labmetal.api.boot")

# A key names a secret if one of these words is inside it: password=, "secret":, token:,
# agent_token, chap_secret, X-Auth-Token, quoted or not. The key starts at a word start (the
# look-behind), the look-ahead finds the word inside the key without leaving the key, and
# the possessive quantifiers (``++``, ``*+``) never give back what they took: no position
# is rescanned. A quoted value runs to its closing quote (escaped characters and the other
# kind of quote included) or to the end; an unquoted one to a space, quote, comma or brace.
_SECRET = re.compile(r"""
    (?P<key> ["']? (?<![\w-]) (?=[\w-]*?(?:password|secret|token)) [\w-]++ ["']?
             \s*+ [:=] \s*+ )
    (?: (?P<quote>["']) (?:[^"'\\] | \\. | (?!(?P=quote))["'])*+ (?P<end>(?P=quote)?)
      | [^\s"',}]++ )
    """, re.IGNORECASE | re.VERBOSE | re.DOTALL)
_TRACEBACKS = logging.Formatter()


def cut(text: str, limit: int) -> str:
    """``text``, or its first ``limit`` characters and how many more there were."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…[{len(text) - limit} more characters]"


def redact(text: str) -> str:
    """``text`` with the values of secret-named keys replaced by ``******``, quotes kept."""
    return _SECRET.sub(_hide, text)


def _hide(match: re.Match[str]) -> str:
    quote = match["quote"] or ""
    return f"{match['key']}{quote}******{match['end'] or ''}"


def bounded(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` cut to ``limit`` characters, then redacted (the mark of the cut is added
    after the redaction, so that an unclosed quote cannot take it for a secret)."""
    if len(text) <= limit:
        return redact(text)
    return redact(text[:limit]) + f"…[{len(text) - limit} more characters]"


def _bounded_traceback(text: str) -> str:
    lines = text.splitlines()
    if len(lines) > MAX_TRACEBACK_LINES:
        half = MAX_TRACEBACK_LINES // 2
        lines = [*lines[:half], f"…[{len(lines) - 2 * half} more lines]", *lines[-half:]]
    return "\n".join(bounded(line) for line in lines)


def _cut_argument(value: object) -> object:
    if isinstance(value, str):
        return cut(value, MAX_VALUE)
    if isinstance(value, bytes) and len(value) > MAX_VALUE:
        return value[:MAX_VALUE] + f"...[{len(value) - MAX_VALUE} more bytes]".encode()
    return value


class RedactSecrets(logging.Filter):
    """Bounds every record (arguments, message, traceback) and redacts secrets in it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, Mapping):
            record.args = {key: _cut_argument(value) for key, value in record.args.items()}
        elif record.args:
            record.args = tuple(_cut_argument(value) for value in record.args)
        try:
            message = record.getMessage()
        except Exception:
            return True  # the handler reports a broken format string itself
        cleaned = bounded(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = _bounded_traceback(_TRACEBACKS.formatException(record.exc_info))
        return True


class RateLimit(logging.Filter):
    """At most ``burst`` records of one message per ``window`` seconds from the loggers
    under ``prefixes`` (see the module's docstring); one instance for all handlers."""

    MAX_KEYS = 1000  # messages tracked at once; the oldest go first

    def __init__(self, prefixes: tuple[str, ...] = FLOOD_LOGGERS, burst: int = FLOOD_BURST,
                 window: float = FLOOD_WINDOW, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.prefixes = prefixes
        self.burst = burst
        self.window = window
        self.clock = clock
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, int, str], list[float | int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefixes):
            return True
        verdict = getattr(record, "labmetal_flood", None)
        if verdict is not None:  # another handler decided on this record already
            return verdict
        verdict = self._let_through(record)
        record.labmetal_flood = verdict  # a record takes any attribute
        return verdict

    def _let_through(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg)[:200])
        with self._lock:
            now = self.clock()
            state = self._seen.pop(key, None) or [now, 0, 0]  # start, passed, dropped
            dropped = 0
            if now - state[0] >= self.window:
                dropped, state = int(state[2]), [now, 0, 0]
            self._seen[key] = state  # last in: the most recent
            if len(self._seen) > self.MAX_KEYS:
                del self._seen[next(iter(self._seen))]
            if state[1] >= self.burst:
                state[2] += 1
                return False
            state[1] += 1
        if dropped:
            record.msg = f"{record.msg} [{dropped} more like this dropped in " \
                         f"{self.window:.0f} s]"
        return True


def setup(level: str = "INFO", log_file: Path | None = None, name: str = "labmetal") -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))  # a cut's "…"
    formatter = logging.Formatter(f"%(asctime)s %(levelname)s {name} %(name)s: %(message)s")
    flood = RateLimit()
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(flood)
        handler.addFilter(RedactSecrets())
    logging.basicConfig(level=level.upper(), handlers=handlers, force=True)
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
