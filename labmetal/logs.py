"""Logging for every process, with a last line of defence against credentials in messages."""
from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

_SECRET = re.compile(r"""(?i)(["']?[\w-]*(?:password|secret|token)[\w-]*["']?\s*[:=]\s*)(["']?)[^\s"',}]+""")


class RedactSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = _SECRET.sub(r"\1\2******", message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def setup(level: str = "INFO", log_file: Path | None = None, name: str = "labmetal") -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    formatter = logging.Formatter(f"%(asctime)s %(levelname)s {name} %(name)s: %(message)s")
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(RedactSecrets())
    logging.basicConfig(level=level.upper(), handlers=handlers, force=True)
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
