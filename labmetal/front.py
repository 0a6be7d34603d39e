"""The production front: nginx before the API, started, watched and stopped by the service.

Why (issue 14, DESIGN §11): waitress alone served at most 100 connections, so 98 idle ones
from a seat stopped the API for everyone; it read every request body before the
application could authenticate it; and it spoke plain HTTP only, so passwords crossed the
seat network in clear. nginx holds thousands of idle or slow connections for little memory
and cuts slow clients off (``client_timeout``), bounds each route's body before reading
it, asks the API whether an upload's caller may upload before it reads the upload
(``auth_request`` to ``GET /v1/auth/check-upload``), limits what one address may have in
flight, and speaks TLS with labmetal's own CA (labmetal/tls.py).

What the front does, by listener:

- ``listen`` (plain HTTP: the seats' iPXE has no TLS): everything, but a request that
  carries credentials (``Authorization``, ``X-Auth-Token``, the login cookie, or the login
  form's ``POST /login``) from another machine is refused with 403 and the https URL to
  use, before anything reads it; the web pages (``/ui``, ``/login``) send other machines'
  browsers to https. The seat login is no exception: labmetal's ramdisk sends it over
  HTTPS (api/seat_login.py), as iPXE (no TLS) cannot. Requests from this machine itself
  (loopback, or from the address they came to) keep working: the local CLI and the tests
  use them.
- ``tls_listen`` (HTTPS): everything.

On both: bodies of at most 1 MiB (the API's own limit for JSON, api/validation.py),
except an image upload (``max_image_size``, streamed, authorized first); per client
address 64 requests in flight and, on the routes seats use (boot scripts, files, the
agent's lookup and heartbeat), 50 requests a second with bursts of 200 queued (paced, not
refused); this machine is not limited. The CA's certificate is at ``/ca.crt``.

waitress listens on a unix socket in the front's private run directory (labmetal/rundir.py):
only the front and root reach it, so the client address nginx passes (``X-Forwarded-For``,
always replaced, never appended to) is trusted there and nowhere else, and
``request.remote_addr`` is the seat's address (api/seat_address.py binds secrets to it).

nginx runs as a child of the service (like dnsmasq, pxe/dnsmasq.py): its configuration is
written at every start from the settings, it is started again if it dies, and it stops
with the service, also when the service is killed (``PR_SET_PDEATHSIG``).

Its workers, which parse what every client sends, do not run as root: a service started as
root runs them as the system user ``labmetal-front`` (made by ``./dev.sh setup`` and
deploy/install.sh), and waitress's socket is then in a directory of its own that only root
and that user's group may pass (``/run/labmetal-front/<id>``, 0710; the socket 0660). Without
that user the workers run as root, and the log says so.
"""
from __future__ import annotations

import ctypes
import grp
import hashlib
import json
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from labmetal.config import FrontSettings
from labmetal.respawn import Respawner
from labmetal.rundir import default_run_root, group_dir, private_dir
from labmetal.tls import WILDCARD_HOSTS, TlsFiles, ensure, server_names

LOG = logging.getLogger(__name__)
# What paths and URLs written into nginx's configuration may hold: nothing that ends a
# directive (space, ;, {, }), quotes, or starts a variable other than https_base's own.
_PLAIN = re.compile(r"[A-Za-z0-9._/@:\[\]+-]+|https://\$server_addr:[0-9]+")

PACKAGE = "nginx"  # Debian's: has the auth_request, ssl, limit_conn and limit_req modules
JSON_LIMIT = 2**20  # bytes; the API's DEFAULT_BODY_LIMIT (api/validation.py)
FRONT_USER = "labmetal-front"  # nginx's workers, when the service runs as root
FRONT_SOCKETS = Path("/run/labmetal-front")  # waitress's sockets, for those workers
UPLOAD_MARGIN = 2**26  # over max_image_size: the API's own check says it first, by name
SEAT_ROUTES = r"^/(boot/|boot\.ipxe$|files/|v1/lookup|v1/heartbeat/|v1/discovery)"
UPLOAD_ROUTE = r"^/v1/images/[^/]+/data$"
# A seat's upload of a local session: pieces of up to block_wire.PIECE_RAW_MAX bytes of
# disk, zlib'd (incompressible data grows a little), under the seats' rate limit.
PIECE_ROUTE = r"^/v1/seat-sessions/[^/]+/sessions/[^/]+/pieces/[0-9]+$"
PIECE_LIMIT = 9 * 2**20
CHECK_UPLOAD = "/v1/auth/check-upload"  # api/front_check.py
ERROR_HEADER = "X-Labmetal-Error"  # api/front_check.py puts a refusal's body there
READY_PATH = "/_labmetal/front"  # answered by nginx itself: the front is up
CHECK_LOCATION = "/_labmetal/check-upload"  # nginx's internal path to CHECK_UPLOAD
RENEW_INTERVAL = 12 * 3600.0  # seconds between two checks of the server certificate
# What nginx answers itself, in the API's words where the API says the same.
TOO_LARGE = "The request body is larger than the 1 MiB this request may have"
UPLOAD_TOO_LARGE = "The upload is larger than the limit of {limit} bytes (max_image_size)"
TOO_MANY = "Too many requests from this address at once; try again in a moment"
NOT_ANSWERING = "The labmetal API is not answering (starting or stopping?); try again soon"
GIVEN_CERTIFICATE = ("This server uses a certificate its operator gave (tls_cert): its CA "
                     "is theirs, not labmetal's")


class FrontError(OSError):
    """The front cannot start: the message says why and what to do (the command line shows
    it as an error, like a missing file)."""


@dataclass(frozen=True)
class Limits:
    """What one client may hold, chosen for a room of about 40 seats behind one server:
    each seat is one address, so one of them can take a few percent of the front at most.
    ``timeout`` (``client_timeout``) is how long a client may take to send its request's
    head, or to send the next piece of its body, or to take the next piece of the answer;
    an idle kept-alive connection is closed after ``keepalive`` seconds."""
    timeout: float = 15.0
    keepalive: float = 30.0
    connections_per_address: int = 64  # requests in flight from one address
    seat_rate: int = 50  # requests per second from one address, on SEAT_ROUTES
    seat_burst: int = 200  # queued past the rate before 429
    worker_connections: int = 8192  # per worker; a proxied request takes two


@dataclass(frozen=True)
class FrontConfig:
    """Everything the nginx configuration is made of."""
    listen: tuple[str, int]  # plain HTTP
    tls_listen: tuple[str, int]
    upstream: Path  # waitress's unix socket
    run_dir: Path  # nginx's configuration and pid file (its temporary files: upstream's)
    tls: TlsFiles
    https_base: str  # what a refusal on the plain listener tells to use; may use $server_addr
    max_upload: int  # bytes, for the upload route
    limits: Limits = Limits()
    user: str | None = None  # the workers' user (root must name one); None: not root
    socket_group: int | None = None  # the group the workers reach waitress's socket with
    public_ca: Path | None = None  # the CA certificate's copy the workers serve at /ca.crt

    @property
    def conf_file(self) -> Path:
        return self.run_dir / "nginx.conf"


def plan(settings: FrontSettings) -> tuple[FrontConfig, Callable[[], bool]]:
    """The front's configuration for ``settings`` (making labmetal's CA and server
    certificate if need be), and the check that renews the certificate (True: renewed)."""
    host, port = settings.listen_host_port
    tls_host, tls_port = settings.tls_listen_host_port
    if not port or not tls_port:
        raise FrontError("the front needs fixed ports: listen and tls_listen may not use "
                         "port 0")
    if (host, port) == (tls_host, tls_port):
        raise FrontError(f"listen and tls_listen are both {host}:{port}")
    digest = hashlib.sha256(f"{settings.state_dir.resolve()}\0{settings.listen}".encode())
    run_dir = private_dir(default_run_root() / f"front-{digest.hexdigest()[:10]}")
    if settings.tls_cert and settings.tls_key:
        tls = TlsFiles(settings.tls_cert.resolve(), settings.tls_key.resolve())

        def renew() -> bool:
            return False
    else:
        url_hosts = [_url_host(url) for url in (settings.public_url, settings.seat_url) if url]

        def names() -> list[str]:
            return server_names([host, tls_host, *url_hosts])

        tls, _ = ensure(settings.tls_dir, names())

        def renew() -> bool:
            return ensure(settings.tls_dir, names())[1]
    user, group, upstream = None, None, run_dir / "app.sock"
    if os.geteuid() == 0:
        try:
            worker = pwd.getpwnam(FRONT_USER)
        except KeyError:
            LOG.warning("nginx's workers run as root: there is no system user %s (./dev.sh "
                        "setup and deploy/install.sh make it)", FRONT_USER)
            user = "root"
        else:
            group = worker.pw_gid
            user = f"{FRONT_USER} {grp.getgrgid(group).gr_name}"
            socket_dir = group_dir(group_dir(FRONT_SOCKETS, group) / digest.hexdigest()[:10],
                                   group)
            upstream = socket_dir / "app.sock"
    public_ca = tls.ca_cert
    if group is not None and tls.ca_cert is not None:  # the workers cannot read the state
        public_ca = upstream.parent / "ca.crt"
        public_ca.write_bytes(tls.ca_cert.read_bytes())
        os.chown(public_ca, os.geteuid(), group)
        os.chmod(public_ca, 0o640)
    config = FrontConfig(
        listen=(host, port), tls_listen=(tls_host, tls_port), upstream=upstream,
        run_dir=run_dir, tls=tls, https_base=https_base(settings),
        max_upload=settings.max_image_size + UPLOAD_MARGIN,
        limits=Limits(timeout=settings.client_timeout), user=user, socket_group=group,
        public_ca=public_ca)
    for value in (config.https_base, config.run_dir, config.upstream, *(path for path in (
            tls.cert, tls.key, tls.ca_cert, config.public_ca) if path)):
        if not _PLAIN.fullmatch(str(value)):
            raise FrontError(f"{value} cannot go into nginx's configuration as it is: use "
                             "letters, digits and . _ - + / : @ [ ] only")
    return config, renew


def https_base(settings: FrontSettings) -> str:
    """The https URL to tell a client on the plain listener: ``public_url`` if it is one,
    else the TLS listener's address; on a wildcard listener the address the client's
    connection came to (nginx's ``$server_addr``), never a name the client sent (Host)."""
    if settings.public_url.startswith("https://"):
        return settings.public_url.rstrip("/")
    host, port = settings.tls_listen_host_port
    if host in WILDCARD_HOSTS:
        return f"https://$server_addr:{port}"
    return f"https://{_bracketed(host)}:{port}"


def render(config: FrontConfig) -> str:
    """The whole nginx configuration. Text only, no I/O: tested without nginx."""
    limits = config.limits
    run = config.run_dir
    timeout = f"{max(1, round(limits.timeout))}s"
    lines = [
        "# written by labmetal (labmetal/front.py) at every start: edits are lost",
        "daemon off;",
        "worker_processes auto;",
        f"worker_rlimit_nofile {limits.worker_connections * 2 + 64};",
        f"pid {run / 'nginx.pid'};",
        "error_log stderr warn;",
        *([f"user {config.user};"] if config.user else []),
        f"events {{ worker_connections {limits.worker_connections}; }}",
        "http {",
        "  access_log off;",
        "  server_tokens off;",
        "  default_type application/json;",
        # Next to waitress's socket: where the workers may go (nginx's master makes each
        # folder theirs); a JSON body past the memory buffer is written there.
        *(f"  {kind}_temp_path {config.upstream.parent / kind};"
          for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")),
        f"  client_header_timeout {timeout};",
        f"  client_body_timeout {timeout};",
        f"  send_timeout {timeout};",
        f"  keepalive_timeout {max(1, round(limits.keepalive))}s;",
        "  keepalive_requests 1000;",
        "  reset_timedout_connection on;",
        "  client_header_buffer_size 1k;",
        "  large_client_header_buffers 4 16k;",
        f"  client_max_body_size {JSON_LIMIT};",
        "  client_body_buffer_size 128k;",
        # Answers stream through small buffers in memory: an image a seat reads slowly is
        # never copied to a temporary file first.
        "  proxy_max_temp_file_size 0;",
        "  proxy_read_timeout 3600s;",
        "  proxy_send_timeout 3600s;",
        "  proxy_http_version 1.1;",
        "  proxy_redirect off;",
        *(f"  {line}" for line in _proxy_headers()),
        # This machine: loopback, or a connection from the address it came to (what Linux
        # chooses for a connection to one of its own addresses; a packet from outside with
        # one of them as source is dropped as a martian).
        '  map "$remote_addr $server_addr" $labmetal_local {',
        r"    ~^(\S+)\s\1$ 1;",
        r"    ~^127\. 1;",
        r'    "~^::1\s" 1;',
        r"    ~^::ffff:127\. 1;",
        "    default 0;",
        "  }",
        '  map "$http_authorization$http_x_auth_token$cookie_labmetal_session"'
        " $labmetal_credentials {",
        '    "" 0;',
        "    default 1;",
        "  }",
        # Refused on the plain listener: credentials from another machine (the seat login
        # too: labmetal's ramdisk sends it over HTTPS), and the login form's password.
        '  map "$labmetal_local$labmetal_credentials $request_method $uri"'
        " $labmetal_in_clear {",
        r"    ~^01\s 1;",
        r"    ~^0.\sPOST\s/login/?$ 1;",
        "    default 0;",
        "  }",
        '  map "$labmetal_local $request_method $uri" $labmetal_to_https {',
        r"    ~^0\s(GET|HEAD)\s/(ui(/.*)?|login/?)$ 1;",
        "    default 0;",
        "  }",
        '  map $labmetal_local $labmetal_client {',
        '    1 "";',  # not counted: this machine
        "    default $binary_remote_addr;",
        "  }",
        "  limit_conn_zone $labmetal_client zone=labmetal_conn:10m;",
        f"  limit_req_zone $labmetal_client zone=labmetal_seats:10m rate={limits.seat_rate}r/s;",
        f"  limit_conn labmetal_conn {limits.connections_per_address};",
        "  limit_conn_status 429;",
        "  limit_req_status 429;",
        "  limit_conn_log_level warn;",
        "  limit_req_log_level warn;",
        "  upstream labmetal_app {",
        f"    server unix:{config.upstream};",
        "    keepalive 32;",
        "  }",
        *_server(config, tls=False),
        *_server(config, tls=True),
        "}",
    ]
    return "\n".join(lines) + "\n"


def _server(config: FrontConfig, tls: bool) -> list[str]:
    host, port = config.tls_listen if tls else config.listen
    address = f"{_bracketed(host)}:{port}" if host not in ("", "0.0.0.0") else str(port)
    lines = ["  server {", f"    listen {address}{' ssl' if tls else ''} backlog=4096;"]
    if tls:
        lines += [f"    ssl_certificate {config.tls.cert};",
                  f"    ssl_certificate_key {config.tls.key};",
                  "    ssl_protocols TLSv1.2 TLSv1.3;",
                  "    ssl_session_cache shared:labmetal_tls:4m;",
                  "    ssl_session_timeout 1h;",
                  "    ssl_session_tickets off;"]
    else:
        in_clear = (f"Credentials are not taken over plain HTTP from another machine: the "
                    f"seat network would see them. Use {config.https_base} (labmetal's CA "
                    f"certificate: /ca.crt)")
        lines += ["    if ($labmetal_in_clear) {",
                  f"      return 403 {_quote(_error(403, in_clear))};",
                  "    }",
                  "    if ($labmetal_to_https) {",
                  f"      return 301 {config.https_base}$request_uri;",
                  "    }"]
    lines += [
        "    error_page 413 @labmetal_413;",
        "    error_page 429 @labmetal_429;",
        "    error_page 502 504 @labmetal_502;",
        f"    location = {READY_PATH} {{ return 204; }}",
        *_ca_location(config),
        f"    location ~ {UPLOAD_ROUTE} {{",
        f"      client_max_body_size {config.max_upload};",
        "      proxy_request_buffering off;",
        f"      auth_request {CHECK_LOCATION};",
        f"      auth_request_set $labmetal_refusal $upstream_http_{_variable(ERROR_HEADER)};",
        "      error_page 401 @labmetal_401;",
        "      error_page 403 @labmetal_403;",
        "      error_page 413 @labmetal_413_upload;",
        "      error_page 429 @labmetal_429;",
        "      error_page 502 504 @labmetal_502;",
        "      proxy_pass http://labmetal_app;",
        "    }",
        f"    location = {CHECK_LOCATION} {{",
        "      internal;",
        "      client_max_body_size 0;",  # the parent's length: not read here
        "      proxy_pass_request_body off;",
        f"      proxy_pass http://labmetal_app{CHECK_UPLOAD};",
        '      proxy_set_header Content-Length "";',
        *(f"      {line}" for line in _proxy_headers()),
        "    }",
        f"    location ~ {PIECE_ROUTE} {{",
        f"      client_max_body_size {PIECE_LIMIT};",
        f"      limit_req zone=labmetal_seats burst={config.limits.seat_burst};",
        "      proxy_pass http://labmetal_app;",
        "    }",
        f"    location ~ {SEAT_ROUTES} {{",
        f"      limit_req zone=labmetal_seats burst={config.limits.seat_burst};",
        "      proxy_pass http://labmetal_app;",
        "    }",
        "    location / {",
        "      proxy_pass http://labmetal_app;",
        "    }",
        "    location @labmetal_401 {",  # auth_request passes the API's WWW-Authenticate on
        "      return 401 $labmetal_refusal;",
        "    }",
        "    location @labmetal_403 {",
        "      return 403 $labmetal_refusal;",
        "    }",
        *_answer("@labmetal_413", 413, TOO_LARGE),
        *_answer("@labmetal_413_upload", 413, UPLOAD_TOO_LARGE.format(
            limit=config.max_upload - UPLOAD_MARGIN)),
        *_answer("@labmetal_429", 429, TOO_MANY, "add_header Retry-After 1 always;"),
        *_answer("@labmetal_502", 502, NOT_ANSWERING),
        "  }",
    ]
    return lines


def _answer(location: str, status: int, message: str, *extra: str) -> list[str]:
    """A named location that answers ``status`` with ``message`` in Ironic's format."""
    return [f"    location {location} {{", *(f"      {line}" for line in extra),
            f"      return {status} {_quote(_error(status, message))};", "    }"]


def _ca_location(config: FrontConfig) -> list[str]:
    if config.tls.ca_cert is None:
        return _answer("= /ca.crt", 404, GIVEN_CERTIFICATE)
    return ["    location = /ca.crt {",
            "      default_type application/x-x509-ca-cert;",
            f"      alias {config.public_ca or config.tls.ca_cert};",
            "    }"]


def _proxy_headers() -> list[str]:
    """What waitress is told about the client: its address (replacing anything the client
    sent as X-Forwarded-For) and the scheme it used; the Host it asked for."""
    return ["proxy_set_header Host $http_host;",
            "proxy_set_header X-Forwarded-For $remote_addr;",
            "proxy_set_header X-Forwarded-Proto $scheme;",
            'proxy_set_header Connection "";']


def _error(status: int, message: str) -> str:
    """Ironic's error body (what the API itself answers), as JSON text."""
    fault = {"faultstring": message, "faultcode": "Client" if status < 500 else "Server",
             "debuginfo": None}
    return json.dumps({"error_message": json.dumps(fault)})


def _quote(text: str) -> str:
    """``text`` as one nginx string: single-quoted, ``\\`` and ``'`` escaped. A ``$``
    starts a variable there: only https_base may hold one ($server_addr)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _variable(header: str) -> str:
    return header.lower().replace("-", "_")


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _url_host(url: str) -> str:
    from urllib.parse import urlsplit
    return urlsplit(url).hostname or ""


def nginx_binary() -> str:
    """nginx's path, or FrontError naming the package to install."""
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx",
                                                                     os.X_OK) else None)
    if found is None:
        raise FrontError(f"the front (front = nginx) needs nginx: apt-get install {PACKAGE} "
                         "(Debian's package has every module it uses), or run without it "
                         "with --front none (plain HTTP from waitress directly: for a "
                         "machine of its own, not a lab network)")
    built = subprocess.run([found, "-V"], capture_output=True, text=True, timeout=30).stderr
    if "--with-http_auth_request_module" not in built or "--with-http_ssl_module" not in built:
        raise FrontError(f"{found} has no auth_request or ssl module: install Debian's "
                         f"{PACKAGE} package")
    return found


def _die_with_parent() -> None:
    """In nginx's master before exec: SIGTERM when the service dies, even by SIGKILL, so
    a killed service leaves no front holding its ports."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Nginx:
    """nginx's master process for one FrontConfig: :meth:`start` writes the configuration,
    checks it (``nginx -t``), starts nginx and returns once it answers; it is started
    again if it dies, told to reload when ``renew`` says the certificate changed, and
    stopped by :meth:`stop`. Its messages go to this process's log."""

    def __init__(self, config: FrontConfig, renew: Callable[[], bool] = lambda: False,
                 restart_delay: float = 1.0, ready_timeout: float = 60.0):
        self.config = config
        self.renew = renew
        self.ready_timeout = ready_timeout
        self._binary = ""
        self._said: deque[str] = deque(maxlen=20)  # its last lines, for an error message
        # Its workers outlive a killed master, holding the ports: each exit ends the group.
        self._child = Respawner("nginx", self._spawn, restart_delay, reap=_end_group)
        self._renewer: threading.Thread | None = None

    @property
    def argv(self) -> list[str]:
        return [self._binary, "-p", f"{self.config.run_dir}/", "-e", "stderr",
                "-c", str(self.config.conf_file)]

    @property
    def pid(self) -> int | None:
        return self._child.pid

    @property
    def restarts(self) -> int:
        return self._child.restarts

    def start(self) -> Nginx:
        self._binary = nginx_binary()
        _write(self.config.conf_file, render(self.config))
        checked = subprocess.run([*self.argv, "-t", "-q"], capture_output=True, text=True,
                                 timeout=60)
        if checked.returncode != 0:
            raise FrontError(f"nginx refuses the front's configuration "
                             f"({self.config.conf_file}): {checked.stderr.strip()}")
        self._child.start()
        self._wait_ready()
        self._child.watch()
        self._renewer = threading.Thread(target=self._renew_loop, name="front-renew",
                                         daemon=True)
        self._renewer.start()
        return self

    def _spawn(self) -> subprocess.Popen:
        process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   start_new_session=True, preexec_fn=_die_with_parent)
        threading.Thread(target=self._relay, args=(process,), name="front-log",
                         daemon=True).start()
        return process

    def _relay(self, process: subprocess.Popen) -> None:
        """nginx's error log (its stderr) into this process's log."""
        assert process.stderr is not None
        for raw in process.stderr:
            line = raw.decode(errors="replace").rstrip()
            self._said.append(line)
            LOG.warning("nginx: %s", line)

    def _wait_ready(self) -> None:
        """Until nginx answers on the plain listener (and accepts on the TLS one); a
        FrontError with nginx's last words if it exits first."""
        host, port = self.config.listen
        tls_host, tls_port = self.config.tls_listen
        deadline = time.monotonic() + self.ready_timeout
        while True:
            process = self._child.process
            assert process is not None
            if process.poll() is not None:
                time.sleep(0.1)  # the relay thread reads its last lines
                raise FrontError(f"nginx exited ({process.returncode}) at start: "
                                 + " / ".join(self._said))
            if _answers(_reachable(host), port) and _accepts(_reachable(tls_host), tls_port):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise FrontError(f"nginx did not answer on {host}:{port} within "
                                 f"{self.ready_timeout:.0f} s")
            time.sleep(0.05)

    def _renew_loop(self) -> None:
        while not self._child.stopping.wait(RENEW_INTERVAL):
            try:
                if self.renew():
                    LOG.info("the front's server certificate was renewed; nginx reloads it")
                    self.reload()
            except Exception:  # noqa: BLE001 - the old certificate stays in use
                LOG.exception("could not renew the front's server certificate")

    def reload(self) -> None:
        self._child.send(signal.SIGHUP)

    def stop(self, timeout: float = 10) -> None:
        process = self._child.stop(timeout)  # SIGTERM: nginx's fast shutdown
        if process is not None:
            _end_group(process)
        if self._renewer is not None:
            self._renewer.join(timeout)
        # Its configuration, pid file and temporary files; the next start writes them anew.
        shutil.rmtree(self.config.run_dir, ignore_errors=True)
        if self.config.upstream.parent != self.config.run_dir:
            shutil.rmtree(self.config.upstream.parent, ignore_errors=True)


def _end_group(process: subprocess.Popen) -> None:
    """Kill what is left of nginx's process group (it has one of its own): workers whose
    master was killed go on serving and holding the listening ports, and nothing else
    would ever stop them."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _reachable(host: str) -> str:
    """Where this machine reaches a listener on ``host``."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    return "::1" if host == "::" else host


def _answers(host: str, port: int) -> bool:
    """nginx answers READY_PATH itself: a 204 says the front is up."""
    try:
        with socket.create_connection((host, port), timeout=2) as sock:
            sock.sendall(f"GET {READY_PATH} HTTP/1.0\r\nHost: {_bracketed(host)}\r\n\r\n"
                         .encode())
            return sock.recv(64).split(b" ")[1:2] == [b"204"]
    except (OSError, IndexError):
        return False


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _write(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".new")
    with open(partial, "w") as handle:
        handle.write(text)
    os.replace(partial, path)
