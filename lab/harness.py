"""Real processes for the tests: labmetal services, virtual BMCs, WoL listeners, PostgreSQL.

Every process is started in its own session and stopped by its PID (SIGTERM, then SIGKILL),
also when a test fails.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import requests

VENV_BIN = Path(sys.executable).parent
LABMETAL = str(VENV_BIN / "labmetal")
BAREMETAL = str(VENV_BIN / "baremetal")


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_udp_range(count: int) -> int:
    """The first of ``count`` consecutive free UDP ports."""
    for _ in range(200):
        first = free_port(socket.SOCK_DGRAM)
        if first + count >= 65000:
            continue
        sockets = []
        try:
            for port in range(first, first + count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError("no free UDP port range")


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Proc:
    """A child process whose output goes to a log file."""
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    popen: subprocess.Popen | None = None

    def start(self) -> Proc:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                      env=self.env, start_new_session=True)
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_output(self, text: str, timeout: float = 30) -> None:
        def seen() -> bool:
            if self.popen is not None and self.popen.poll() is not None:
                raise AssertionError(f"{self.argv[:3]} exited early:\n{self.output()[-3000:]}")
            return text in self.output()
        wait_for(seen, timeout, f"'{text}' from {' '.join(self.argv[:3])}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen is not None and self.popen.poll() is None:
            os.killpg(self.popen.pid, sig)
            self.popen.wait(timeout=30)

    def stop(self, timeout: float = 20) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        try:
            os.killpg(self.popen.pid, signal.SIGTERM)
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        except ProcessLookupError:
            pass


@dataclass
class Processes:
    """Everything a test started; stopped in reverse order at teardown."""
    workdir: Path
    started: list[Proc] = field(default_factory=list)

    def start(self, argv: list[str], name: str, env: dict[str, str] | None = None) -> Proc:
        proc = Proc(argv, self.workdir / f"{name}.log", env).start()
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            proc.stop()


@dataclass
class Service:
    """A running labmetal API (all-in-one or api-only) and how to reach it."""
    url: str
    proc: Proc
    state_dir: Path
    database: str

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(self.url + path, timeout=30, **kwargs)

    def put(self, path: str, body: Any, **kwargs) -> requests.Response:
        return requests.put(self.url + path, json=body, timeout=30, **kwargs)

    def post(self, path: str, body: Any, **kwargs) -> requests.Response:
        return requests.post(self.url + path, json=body, timeout=30, **kwargs)

    def patch(self, path: str, body: Any, **kwargs) -> requests.Response:
        return requests.patch(self.url + path, json=body, timeout=30, **kwargs)

    def delete(self, path: str, **kwargs) -> requests.Response:
        return requests.delete(self.url + path, timeout=30, **kwargs)

    def node(self, ident: str) -> dict[str, Any]:
        response = self.get(f"/v1/nodes/{ident}",
                            headers={"X-OpenStack-Ironic-API-Version": "latest"})
        response.raise_for_status()
        return response.json()

    def history(self, ident: str) -> list[dict[str, Any]]:
        response = self.get(f"/v1/nodes/{ident}/history?detail=true",
                            headers={"X-OpenStack-Ironic-API-Version": "latest"})
        response.raise_for_status()
        return response.json()["history"]

    def wait_node(self, ident: str, condition: Callable[[dict], bool], timeout: float = 30,
                  what: str = "node state") -> dict[str, Any]:
        return wait_for(lambda: (lambda n: n if condition(n) else None)(self.node(ident)),
                        timeout, f"{what} of {ident}", interval=0.1)


def error_text(response: requests.Response) -> str:
    """The human message inside Ironic's double-encoded error body."""
    return json.loads(response.json()["error_message"])["faultstring"]


def service_env(**settings: Any) -> dict[str, str]:
    # The front's HTTPS listener (labmetal/front.py): a free port on the service's listen
    # host, so that services started at once (by one test, or by tests run side by side)
    # do not all ask for the default 6443.
    if "tls_listen" not in settings:
        listen_port = str(settings.get("listen", "")).rpartition(":")[2]
        port = free_port()
        while str(port) == listen_port:  # a port just closed may be handed out again
            port = free_port()
        settings["tls_listen"] = str(port)
    env = dict(os.environ)
    env.update({f"LABMETAL_{key.upper()}": str(value) for key, value in settings.items()})
    return env


def start_service(procs: Processes, name: str, command: str = "serve", database: str | None = None,
                  state_dir: Path | None = None, host: str = "127.0.0.1",
                  port: int | None = None, **settings: Any) -> Service:
    """``port`` and ``state_dir`` of an earlier service start it again as it was."""
    state_dir = state_dir or procs.workdir / f"{name}-state"
    port = port or free_port()
    database = database or f"sqlite:///{state_dir / 'labmetal.db'}"
    # Without accounts unless the test asks for them; on a room's address (not loopback)
    # that takes the explicit flag, as it would for an operator.
    settings.setdefault("auth", "noauth")
    if settings["auth"] == "noauth" and not host.startswith("127."):
        settings.setdefault("allow_noauth", "true")
    env = service_env(state_dir=state_dir, database=database, listen=f"{host}:{port}",
                      hostname=settings.pop("hostname", name),
                      log_file=procs.workdir / f"{name}.service.log", **settings)
    proc = procs.start([LABMETAL, command], name, env)
    proc.wait_for_output("listening on http://", timeout=60)
    service = Service(f"http://{host}:{port}", proc, state_dir, database)
    wait_for(lambda: service.get("/").ok, 10, "the API")
    return service


def start_conductor(procs: Processes, name: str, database: str, secret_key_file: Path,
                    **settings: Any) -> Proc:
    env = service_env(database=database, hostname=name, secret_key_file=secret_key_file,
                      state_dir=procs.workdir / f"{name}-state",
                      log_file=procs.workdir / f"{name}.service.log", **settings)
    proc = procs.start([LABMETAL, "conductor"], name, env)
    proc.wait_for_output("running", timeout=60)
    return proc


def start_bmcs(procs: Processes, count: int, user: str = "admin", password: str = "s3cret",
               power_delay: float = 0.0, first_port: int | None = None, name: str = "bmc") -> int:
    first_port = first_port or free_udp_range(count)
    proc = procs.start([LABMETAL, "lab", "bmc", "--port", str(first_port), "--count", str(count),
                        "--user", user, "--password", password,
                        "--power-delay", str(power_delay)], name)
    proc.wait_for_output("virtual BMC(s) on", timeout=30)
    return first_port


def ipmitool_power(port: int, user: str = "admin", password: str = "s3cret",
                   action: str = "status", host: str = "127.0.0.1") -> str:
    """Ask a BMC with ipmitool: an independent IPMI client, not labmetal's code."""
    result = subprocess.run(["ipmitool", "-I", "lanplus", "-H", host, "-p", str(port),
                             "-U", user, "-P", password, "power", action],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@dataclass
class Baremetal:
    """The real `baremetal` CLI of python-ironicclient."""
    endpoint: str
    home: Path
    user: str | None = None
    password: str | None = None

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        auth = (["--os-auth-type", "http_basic", "--os-username", self.user,
                 "--os-password", self.password] if self.user else ["--os-auth-type", "none"])
        env = {**os.environ, "HOME": str(self.home), "XDG_CACHE_HOME": str(self.home / ".cache")}
        for key in [k for k in env if k.startswith("OS_")]:
            env.pop(key)
        # 409s are retried by the client (5 x 2 s by default); keep the retries, not the wait.
        retries = ["--max-retries", "2", "--retry-interval", "0"]
        result = subprocess.run([BAREMETAL, *auth, *retries, "--os-endpoint", self.endpoint, *args],
                                capture_output=True, text=True, env=env, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(f"baremetal {' '.join(args)} failed ({result.returncode}):\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "-f", "json").stdout)


@dataclass
class Postgres:
    url: str
    datadir: Path
    pg_ctl: str
    as_postgres: list[str]

    def new_database(self, name: str) -> str:
        subprocess.run([*self.as_postgres, str(Path(self.pg_ctl).parent / "createdb"), "-h",
                        "127.0.0.1", "-p", self.url.rsplit(":", 1)[1], "-U", "postgres", name],
                       check=True, capture_output=True)
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.url.rsplit(':', 1)[1]}/{name}"

    def stop(self) -> None:
        self.halt(check=False)
        shutil.rmtree(self.datadir, ignore_errors=True)

    def halt(self, check: bool = True) -> None:
        """The server stops at once, its data kept: a database outage (resume() ends it)."""
        subprocess.run([*self.as_postgres, self.pg_ctl, "-D", str(self.datadir), "-m", "immediate",
                        "stop"], capture_output=True, check=check)

    def resume(self) -> None:
        _pg_start(self.pg_ctl, self.datadir, self.as_postgres, int(self.url.rsplit(":", 1)[1]))


def _pg_start(pg_ctl: str, datadir: Path, as_postgres: list[str], port: int) -> None:
    subprocess.run([*as_postgres, pg_ctl, "-D", str(datadir), "-l", str(datadir / "server.log"),
                    "-w", "-o", f"-p {port} -k {datadir} -c listen_addresses=127.0.0.1 "
                    "-c max_connections=300 -c fsync=off", "start"],
                   check=True, capture_output=True)


def start_postgres() -> Postgres:
    """A private PostgreSQL cluster on a free port, from Debian's packages."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if not candidates:
        raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
    pg_ctl = str(candidates[-1])
    bindir = Path(pg_ctl).parent
    datadir = Path(tempfile.mkdtemp(prefix="labmetal-pg-"))
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(datadir, "postgres", "postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    subprocess.run([*as_postgres, str(bindir / "initdb"), "-D", str(datadir), "-U", "postgres",
                    "--auth=trust", "-E", "UTF8"], check=True, capture_output=True)
    _pg_start(pg_ctl, datadir, as_postgres, port)
    return Postgres(f"127.0.0.1:{port}", datadir, pg_ctl, as_postgres)
