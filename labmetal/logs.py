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
"""
from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping
from pathlib import Path

MAX_VALUE = 2000
MAX_MESSAGE = 8000
MAX_TRACEBACK_LINES = 200  # the first and last half of a longer traceback are kept

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


def setup(level: str = "INFO", log_file: Path | None = None, name: str = "labmetal") -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))  # a cut's "…"
    formatter = logging.Formatter(f"%(asctime)s %(levelname)s {name} %(name)s: %(message)s")
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(RedactSecrets())
    logging.basicConfig(level=level.upper(), handlers=handlers, force=True)
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
