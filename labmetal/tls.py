"""labmetal's own certificate authority, for the HTTPS front (labmetal/front.py).

Why: passwords must not cross the seat network in clear (DESIGN §11), and a lab server
rarely has a public DNS name that a public CA would certify. So at its first start the
service makes a CA (a key and a self-signed certificate) in the state directory, and a
server certificate signed by it for the names the service is reached at. Admins install the
CA's certificate once (the front serves it at ``/ca.crt``; its SHA-256 fingerprint is in the
service's log, to compare), the CLI finds it in the state directory, and the deploy ramdisk
can pin it.

The server certificate is made again, at start and by the front's daily check, when the
names it must carry changed (another ``listen`` address, a new host name) or when it has
less than ``RENEW_BEFORE`` left. The CA is never replaced on its own: every browser that
trusts it would have to install the new one. An operator's own certificate and key
(``tls_cert``, ``tls_key``) are used as given instead; nothing is made then.

Keys are ECDSA P-256: made in milliseconds, and understood by every client labmetal has
(browsers, Python, curl, the ramdisk). Everything here is private (0700 directory, 0600
files), like the rest of the state.
"""
from __future__ import annotations

import datetime
import ipaddress
import json
import os
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_LIFETIME = datetime.timedelta(days=20 * 365)
SERVER_LIFETIME = datetime.timedelta(days=365)
RENEW_BEFORE = datetime.timedelta(days=30)
WILDCARD_HOSTS = ("", "0.0.0.0", "::")


@dataclass(frozen=True)
class TlsFiles:
    """What the front's TLS listener uses. ``ca_cert`` is labmetal's CA, None for an
    operator's own certificate (its CA is the operator's, known already)."""
    cert: Path
    key: Path
    ca_cert: Path | None = None

    @property
    def fingerprint(self) -> str | None:
        """The CA certificate's SHA-256 fingerprint (AB:CD:...), for admins to compare
        with what their browser shows before they trust it."""
        if self.ca_cert is None:
            return None
        cert = x509.load_pem_x509_certificate(self.ca_cert.read_bytes())
        return ":".join(f"{byte:02X}" for byte in cert.fingerprint(hashes.SHA256()))


def ca_pin(ca_cert: Path) -> str:
    """The CA certificate's SHA-256 over its DER form, in hex: what labmetal's ramdisk is
    told on its kernel command line, to check the CA it fetches over plain HTTP before it
    trusts it with a password (agent/seat_login.py)."""
    cert = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    return cert.fingerprint(hashes.SHA256()).hex()


def server_names(hosts: list[str]) -> list[str]:
    """The names a server certificate must carry: every host the service listens on or is
    reached at (an address on a wildcard listener: each of this machine's addresses), the
    machine's names, and loopback for the local CLI. Sorted, without duplicates."""
    names = {"localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn()}
    for host in hosts:
        if host in WILDCARD_HOSTS:
            names.update(machine_addresses())
        else:
            names.add(host)
    return sorted(name.lower() for name in names if name)


def machine_addresses() -> list[str]:
    """This machine's IP addresses (``ip -json addr``); none if ``ip`` cannot tell."""
    try:
        listing = subprocess.run(["ip", "-json", "addr", "show"], capture_output=True,
                                 text=True, timeout=10, check=True).stdout
        return [info["local"] for link in json.loads(listing)
                for info in link.get("addr_info", []) if info.get("local")]
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, TypeError):
        return []


def ensure(directory: Path, names: list[str],
           now: datetime.datetime | None = None) -> tuple[TlsFiles, bool]:
    """labmetal's CA and a server certificate for ``names`` in ``directory`` (made if
    missing; the server certificate made again if its names differ, it expires within
    ``RENEW_BEFORE`` or another CA signed it). Returns the files and whether the server
    certificate is new."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    ca_cert_path = directory / "ca.crt"
    files = TlsFiles(directory / "server.crt", directory / "server.key", ca_cert_path)
    ca_key_path = directory / "ca.key"
    if ca_cert_path.exists() and ca_key_path.exists():
        ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _ca_certificate(ca_key, now)
        _write_private(ca_key_path, _key_pem(ca_key))
        _write_private(ca_cert_path, ca_cert.public_bytes(serialization.Encoding.PEM))
    if _current(files.cert, ca_cert, names, now) and files.key.exists():
        return files, False
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _server_certificate(key, names, ca_cert, ca_key, now)  # type: ignore[arg-type]
    _write_private(files.key, _key_pem(key))
    _write_private(files.cert, cert.public_bytes(serialization.Encoding.PEM))
    return files, True


def certificate_names(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for, as text, sorted."""
    try:
        alternative = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    values = alternative.value
    return sorted([*values.get_values_for_type(x509.DNSName),
                   *(str(ip) for ip in values.get_values_for_type(x509.IPAddress))])


def _current(path: Path, ca_cert: x509.Certificate, names: list[str],
             now: datetime.datetime) -> bool:
    """The server certificate at ``path`` can stay: same names, same CA, not near its end."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return False
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (InvalidSignature, ValueError, TypeError):  # another CA's: made again
        return False
    return (certificate_names(cert) == sorted(_canonical(names))
            and cert.not_valid_after_utc - now > RENEW_BEFORE)


def _canonical(names: list[str]) -> list[str]:
    """Names as a certificate gives them back (IPv6 addresses compressed)."""
    result = []
    for name in names:
        try:
            result.append(str(ipaddress.ip_address(name)))
        except ValueError:
            result.append(name)
    return result


def _ca_certificate(key: ec.EllipticCurvePrivateKey, now: datetime.datetime) -> x509.Certificate:
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "labmetal"),
        x509.NameAttribute(NameOID.COMMON_NAME,
                           f"labmetal CA {socket.gethostname()} {now:%Y-%m-%d}"[:64]),
    ])
    public = key.public_key()
    return (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key, hashes.SHA256()))


def _server_certificate(key: ec.EllipticCurvePrivateKey, names: list[str],
                        ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
                        now: datetime.datetime) -> x509.Certificate:
    alternatives: list[x509.GeneralName] = []
    for name in names:
        try:
            alternatives.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alternatives.append(x509.DNSName(name))
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "labmetal"),
                         x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])])
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(min(now + SERVER_LIFETIME, ca_cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ca_ski), critical=False)
            .sign(ca_key, hashes.SHA256()))


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_private(path: Path, data: bytes) -> None:
    """Whole or not at all (nginx may read it on a reload), mode 0600 from the start."""
    partial = path.with_name(path.name + ".new")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(partial, path)
