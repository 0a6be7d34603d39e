"""University accounts through a real OpenLDAP slapd (Debian's package), started for the test
on a free port with its own configuration and database, and stopped by its PID."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import requests

from labmetal.lab.harness import (LABMETAL, Proc, Processes, error_text, free_port, service_env,
                                  start_service, wait_for)

SUFFIX = "dc=lab,dc=test"
ROOT_DN, ROOT_PASSWORD = f"cn=admin,{SUFFIX}", "directory admin secret"
PEOPLE = {"prof": "prof's ldap phrase", "etu": "etu's ldap phrase", "boss": "boss ldap phrase"}
SLAPD_CONF = """include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
modulepath /usr/lib/ldap
moduleload back_mdb
moduleload memberof
pidfile {dir}/slapd.pid
database mdb
maxsize 16777216
suffix "{suffix}"
rootdn "{root_dn}"
rootpw "{root_password}"
directory {dir}/data
overlay memberof
access to attrs=userPassword by self write by anonymous auth by * none
access to * by self read by users read by * none
"""


def ldif(*entries: dict[str, list[str] | str]) -> str:
    blocks = []
    for entry in entries:
        lines = []
        for key, values in entry.items():
            lines += [f"{key}: {value}" for value in ([values] if isinstance(values, str)
                                                       else values)]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def person(uid: str) -> dict:
    return {"dn": f"uid={uid},ou=people,{SUFFIX}", "objectClass": "inetOrgPerson",
            "uid": uid, "cn": uid, "sn": uid, "userPassword": PEOPLE[uid]}


def group(cn: str, *members: str) -> dict:
    return {"dn": f"cn={cn},ou=groups,{SUFFIX}", "objectClass": "groupOfNames", "cn": cn,
            "member": [f"uid={uid},ou=people,{SUFFIX}" for uid in members]}


class Slapd:
    def __init__(self, url: str, proc: Proc):
        self.url, self.proc = url, proc

    def ldap(self, tool: str, text: str) -> None:
        subprocess.run([tool, "-x", "-H", self.url, "-D", ROOT_DN, "-w", ROOT_PASSWORD],
                       input=text, check=True, capture_output=True, text=True, timeout=30)


@pytest.fixture
def slapd(tmp_path: Path):
    if shutil.which("/usr/sbin/slapd") is None or shutil.which("ldapadd") is None:
        pytest.fail("slapd and ldap-utils are not installed (./dev.sh setup installs them)")
    workdir = tmp_path / "slapd"
    (workdir / "data").mkdir(parents=True)
    conf = workdir / "slapd.conf"
    conf.write_text(SLAPD_CONF.format(dir=workdir, suffix=SUFFIX, root_dn=ROOT_DN,
                                      root_password=ROOT_PASSWORD))
    url = f"ldap://127.0.0.1:{free_port()}"
    processes = Processes(workdir)
    # -d keeps slapd in the foreground, so the PID we hold is slapd's own.
    proc = processes.start(["/usr/sbin/slapd", "-f", str(conf), "-h", url + "/", "-d", "0"],
                           "slapd")
    server = Slapd(url, proc)
    try:
        wait_for(lambda: subprocess.run(["ldapwhoami", "-x", "-H", url, "-D", ROOT_DN, "-w",
                                         ROOT_PASSWORD], capture_output=True).returncode == 0,
                 20, "slapd to answer")
        server.ldap("ldapadd", ldif(
            {"dn": SUFFIX, "objectClass": ["dcObject", "organization"], "o": "lab", "dc": "lab"},
            {"dn": f"ou=people,{SUFFIX}", "objectClass": "organizationalUnit", "ou": "people"},
            {"dn": f"ou=groups,{SUFFIX}", "objectClass": "organizationalUnit", "ou": "groups"},
            person("prof"), person("etu"), person("boss"),
            group("teachers", "prof"), group("labadmins", "boss"), group("chess-club", "etu")))
        yield server
    finally:
        processes.stop_all()
        assert proc.popen.poll() is not None


def test_university_accounts_log_in_with_their_directory_password_and_group_role(
        procs, slapd, tmp_path):
    service = start_service(procs, "ldap", auth="http_basic",
                            ldap_url=slapd.url,
                            ldap_user_dn_template=f"uid={{user}},ou=people,{SUFFIX}",
                            ldap_role_attribute="memberOf",
                            ldap_role_map="teachers=teacher; labadmins=admin")
    prof, etu, boss = ((uid, PEOPLE[uid]) for uid in ("prof", "etu", "boss"))

    # first login: a local record (source ldap, no password) with the group's role
    assert service.get("/v1/nodes", auth=prof).status_code == 200
    me = service.get("/v1/users/prof", auth=prof).json()
    assert (me["role"], me["source"]) == ("teacher", "ldap")
    refused = service.post("/v1/nodes", {"driver": "wol"}, auth=prof)
    assert refused.status_code == 403 and "role teacher" in error_text(refused)
    assert service.get("/v1/users/etu", auth=etu).json()["role"] == "student"  # default
    assert service.get("/v1/nodes", auth=etu).status_code == 403
    assert service.post("/v1/nodes", {"driver": "wol", "name": "pc1"}, auth=boss).ok

    # wrong, empty (an anonymous bind "succeeds" in LDAP) and unknown: all refused
    for credentials in (("prof", "wrong"), ("prof", ""), ("nobody", "x"), ("prof*", "x")):
        assert service.get("/v1/nodes", auth=credentials).status_code == 401, credentials
    users = service.get("/v1/users", auth=boss).json()["users"]
    assert sorted(u["name"] for u in users) == ["boss", "etu", "prof"]

    # the web login works the same; the directory's groups are read at every login
    slapd.ldap("ldapmodify", f"dn: cn=teachers,ou=groups,{SUFFIX}\nchangetype: modify\n"
                             f"add: member\nmember: uid=etu,ou=people,{SUFFIX}\n")
    browser = requests.Session()
    csrf = browser.get(service.url + "/v1/auth/session").json()["csrf_token"]
    logged = browser.post(service.url + "/login", json={"user": "etu", "password": etu[1]},
                          headers={"X-CSRF-Token": csrf})
    assert logged.status_code == 200 and logged.json()["role"] == "teacher"
    assert browser.get(service.url + "/v1/nodes").status_code == 200

    # the password is the directory's; an admin can still shut an account out
    own = service.patch("/v1/users/prof", {"password": "new", "old_password": prof[1]},
                        auth=prof)
    assert own.status_code == 400 and "LDAP" in error_text(own)
    assert service.patch("/v1/users/prof", {"disabled": True}, auth=boss).ok
    assert service.get("/v1/nodes", auth=prof).status_code == 401

    # a directory that stops answering refuses logins instead of failing the API
    slapd.proc.stop()
    browser = requests.Session()
    csrf = browser.get(service.url + "/v1/auth/session").json()["csrf_token"]
    down = browser.post(service.url + "/login", json={"user": "boss", "password": boss[1]},
                        headers={"X-CSRF-Token": csrf})
    assert down.status_code == 401
    log = (procs.workdir / "ldap.service.log").read_text()
    assert "cannot check boss" in log
    for secret in PEOPLE.values():
        assert secret not in log


def test_a_wrong_ldap_setting_stops_the_start(tmp_path):
    env = service_env(state_dir=tmp_path, auth="http_basic", listen="127.0.0.1:0",
                      ldap_url="ldap://127.0.0.1:1", ldap_user_dn_template="uid=x,dc=lab")
    result = subprocess.run([LABMETAL, "serve"], capture_output=True, text=True, timeout=60,
                            env=env)
    assert result.returncode != 0 and "must contain {user}" in result.stderr
