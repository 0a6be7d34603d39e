"""University accounts: a password is checked by binding to the LDAP directory as the user.

The user's DN comes from a template (``uid={user},ou=people,dc=lab,dc=test``), so no search
account is needed. The role comes from one attribute of the user's entry (``memberOf``,
``employeeType``...) mapped through ``ldap_role_map``; a DN value also matches by its first
RDN's value (``cn=teachers,ou=groups,...`` matches ``teachers``). The most privileged mapped
role wins; nothing mapped gives ``ldap_default_role``. Without ``ldap_role_attribute`` the
directory says nothing about roles: a new account gets ``ldap_default_role``, and an admin
sets other roles locally (``labmetal user set NAME --ldap --role teacher``).
"""
from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, field

import ldap3
from ldap3.core.exceptions import LDAPException
from ldap3.utils.dn import escape_rdn, parse_dn

from labmetal.config import DirectorySettings
from labmetal.users import NAME_PATTERN, ROLES, DirectoryAccount

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Directory:
    url: str
    user_dn_template: str
    role_attribute: str = ""
    role_map: dict[str, str] = field(default_factory=dict)  # lower-cased value -> role
    default_role: str = "student"
    timeout: float = 5.0

    @classmethod
    def from_settings(cls, settings: DirectorySettings) -> Directory | None:
        """None without ``ldap_url``; a ValueError naming the setting that is wrong."""
        if not settings.ldap_url:
            return None
        if not settings.ldap_url.startswith(("ldap://", "ldaps://")):
            raise ValueError(f"ldap_url must start with ldap:// or ldaps://, not "
                             f"{settings.ldap_url!r}")
        if "{user}" not in settings.ldap_user_dn_template:
            raise ValueError("ldap_user_dn_template must contain {user}, e.g. "
                             "uid={user},ou=people,dc=example,dc=org")
        if settings.ldap_default_role not in ROLES:
            raise ValueError(f"ldap_default_role must be one of {', '.join(ROLES)}")
        return cls(settings.ldap_url, settings.ldap_user_dn_template,
                   settings.ldap_role_attribute, parse_role_map(settings.ldap_role_map),
                   settings.ldap_default_role, settings.ldap_timeout)

    def user_dn(self, name: str) -> str:
        return self.user_dn_template.replace("{user}", escape_rdn(name))

    def check(self, name: str, password: str) -> DirectoryAccount | None:
        """The account if the directory accepts the password, else None. An empty
        password is refused here: LDAP treats it as an anonymous bind, which "succeeds"."""
        if not password or not NAME_PATTERN.match(name):
            return None
        dn = self.user_dn(name)
        # ldap3 does not check the server's certificate unless told to.
        server = ldap3.Server(self.url, connect_timeout=self.timeout, get_info=ldap3.NONE,
                              tls=ldap3.Tls(validate=ssl.CERT_REQUIRED))
        connection = ldap3.Connection(server, user=dn, password=password, read_only=True,
                                      receive_timeout=max(1, round(self.timeout)),
                                      raise_exceptions=False)  # ldap3 wants an int
        try:
            if not connection.bind():
                LOG.info("LDAP refused the bind of %s: %s", dn,
                         connection.result.get("description"))
                return None
            return DirectoryAccount(self._role(connection, dn))
        except LDAPException as error:
            LOG.warning("LDAP server %s cannot check %s: %s", self.url, name,
                        type(error).__name__)
            return None
        finally:
            connection.unbind()

    def _role(self, connection: ldap3.Connection, dn: str) -> str | None:
        if not self.role_attribute:
            return None
        connection.search(dn, "(objectClass=*)", ldap3.BASE, attributes=[self.role_attribute])
        values = []
        for entry in connection.response or []:
            found = entry.get("attributes", {}).get(self.role_attribute, [])
            values += found if isinstance(found, list) else [found]
        roles = {role for value in values for role in self._mapped(str(value))}
        return min(roles, key=ROLES.index) if roles else self.default_role

    def _mapped(self, value: str) -> list[str]:
        keys = [value.lower()]
        try:
            keys.append(parse_dn(value)[0][1].lower())
        except (LDAPException, IndexError):
            pass
        return [self.role_map[key] for key in keys if key in self.role_map]


def parse_role_map(text: str) -> dict[str, str]:
    """``"teachers=teacher; cn=x,ou=groups,dc=lab=admin"``: each pair split at its last '='."""
    mapping = {}
    for pair in filter(None, (part.strip() for part in text.split(";"))):
        value, sep, role = pair.rpartition("=")
        if not sep or not value.strip() or role.strip() not in ROLES:
            raise ValueError(f"ldap_role_map: {pair!r} is not VALUE=ROLE with a role of "
                             f"{', '.join(ROLES)}")
        mapping[value.strip().lower()] = role.strip()
    return mapping
