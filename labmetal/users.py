"""User accounts: bcrypt password hashes and roles (admin, teacher, student)."""
from __future__ import annotations

import bcrypt
from sqlalchemy import select

from labmetal.db import Database
from labmetal.models import User

ROLES = ("admin", "teacher", "student")


def hash_password(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt()).decode()


def password_matches(password: str, password_hash: str) -> bool:
    try:
        return bcrypt.checkpw(password.encode(), password_hash.encode())
    except ValueError:
        return False


def set_user(db: Database, name: str, password: str, role: str = "admin") -> None:
    """Create the user, or change the password and role of an existing one."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    if not name or not password:
        raise ValueError("a user needs a name and a password")
    with db.write() as session:
        user = session.scalar(select(User).where(User.name == name))
        if user is None:
            session.add(User(name=name, password_hash=hash_password(password), role=role))
        else:
            user.password_hash = hash_password(password)
            user.role = role


def find_user(db: Database, name: str) -> User | None:
    with db.read() as session:
        return session.scalar(select(User).where(User.name == name))
