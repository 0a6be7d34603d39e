"""What the production front is told, without nginx or root: the rendered nginx configuration
(bodies bounded per route, what one address may hold), the HTTPS base a wildcard listener
sends clients to, and the server certificate made again for new names or near its end
(the real front: tests/test_front.py)."""
from __future__ import annotations

import datetime
import socket
import stat

import pytest
from cryptography import x509

from labmetal.config import Settings
from labmetal.front import FrontConfig, https_base, render
from labmetal.tls import (RENEW_BEFORE, SERVER_LIFETIME, TlsFiles, certificate_names, ensure,
                          server_names)

pytestmark = pytest.mark.fast

MiB = 2**20
GiB = 2**30


def test_the_front_bounds_bodies_per_route_and_what_one_address_may_hold(tmp_path):
    config = FrontConfig(listen=("10.99.1.2", 6385), tls_listen=("10.99.1.2", 6443),
                         upstream=tmp_path / "app.sock", run_dir=tmp_path,
                         tls=TlsFiles(tmp_path / "s.crt", tmp_path / "s.key", tmp_path / "ca.crt"),
                         https_base="https://10.99.1.2:6443", max_upload=3 * GiB)
    text = render(config)
    http = text.split("  server {")[0]
    assert f"client_max_body_size {MiB};" in http  # every route, unless it says otherwise
    assert "limit_conn labmetal_conn 64;" in http and "rate=50r/s" in http
    assert "client_header_timeout 15s;" in http and "client_body_timeout 15s;" in http
    # the client's address replaces whatever X-Forwarded-For it sent, never appended to it
    assert "proxy_set_header X-Forwarded-For $remote_addr;" in http
    assert "proxy_add_x_forwarded_for" not in text
    plain, tls = text.split("  server {")[1:]
    assert "listen 10.99.1.2:6385 backlog" in plain and "ssl" not in plain.split(";")[0]
    assert "listen 10.99.1.2:6443 ssl" in tls
    for server in (plain, tls):
        upload = server.split("location ~ ^/v1/images/")[1].split("    }")[0]
        assert f"client_max_body_size {3 * GiB};" in upload
        assert "proxy_request_buffering off;" in upload
        assert "auth_request /_labmetal/check-upload;" in upload
        assert "limit_req zone=labmetal_seats burst=200;" in server
    assert "if ($labmetal_in_clear)" in plain and "if ($labmetal_in_clear)" not in tls
    assert "return 301 https://10.99.1.2:6443$request_uri;" in plain


def test_a_wildcard_listener_sends_clients_to_the_address_they_came_to_not_their_host():
    settings = Settings(listen="0.0.0.0:6385").front_end
    assert https_base(settings) == "https://$server_addr:6443"  # never $host: the client's
    assert https_base(Settings(listen="10.9.9.9:80", tls_listen="8443").front_end) == \
        "https://10.9.9.9:8443"
    assert https_base(Settings(public_url="https://lab.example:6443/").front_end) == \
        "https://lab.example:6443"


def test_the_server_certificate_is_made_again_for_new_names_or_near_its_end(tmp_path):
    directory = tmp_path / "tls"
    names = server_names(["10.99.1.2"])
    first, made = ensure(directory, names)
    assert made and stat.S_IMODE(directory.stat().st_mode) == 0o700
    ca = first.ca_cert.read_bytes()
    assert ensure(directory, names) == (first, False)
    assert ensure(directory, server_names(["10.99.7.2"]))[1]  # a new address
    later = datetime.datetime.now(datetime.timezone.utc) + SERVER_LIFETIME - RENEW_BEFORE
    names = server_names(["10.99.7.2"])
    assert ensure(directory, names, now=later)[1]  # a month before its end
    assert first.ca_cert.read_bytes() == ca  # the CA stays: browsers trust it
    cert = x509.load_pem_x509_certificate(first.cert.read_bytes())
    assert {"10.99.7.2", socket.gethostname().lower()} <= set(certificate_names(cert))

