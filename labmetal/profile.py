"""The CLI's login profile: the API's URL and a token from `labmetal login`, in
~/.config/labmetal/profile.toml (mode 0600: the token is as good as the password until it
expires or is revoked)."""
from __future__ import annotations

import json
import os
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Profile:
    url: str
    user: str
    token: str
    token_uuid: str
    expires_at: str | None = None


def profile_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "labmetal" / "profile.toml"


def load_profile(path: Path | None = None) -> Profile | None:
    path = path or profile_path()
    try:
        with open(path, "rb") as fh:
            values = tomllib.load(fh)
    except FileNotFoundError:
        return None
    # A file `labmetal login` wrote: every field is there (a missing one would be None).
    return Profile(**{key: values.get(key)  # type: ignore[arg-type]
                      for key in Profile.__dataclass_fields__})


def save_profile(profile: Profile, path: Path | None = None) -> Path:
    """Written whole to a 0600 file next to it, then renamed: never readable by others,
    not even for a moment."""
    path = path or profile_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # JSON strings are valid TOML basic strings.
    text = "".join(f"{key} = {json.dumps(value)}\n" for key, value in asdict(profile).items()
                   if value is not None)
    partial = path.with_suffix(".tmp")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(partial, path)
    return path


def remove_profile(path: Path | None = None) -> bool:
    try:
        (path or profile_path()).unlink()
        return True
    except FileNotFoundError:
        return False
