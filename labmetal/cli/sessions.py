"""`labmetal template ...` and `labmetal session ...`: TP templates (teachers) and students'
sessions of them, through the REST API (/v1/templates, /v1/sessions).

A session is named by its UUID, or by its template's name: the caller's session of that
template (`--student NAME` for a teacher's or admin's look at someone else's).
`session start TP --seat NODE` makes the session first if the student has none yet.
`session export` downloads a copy of a session's disk; `template export` the whole class's.
Credentials and the API URL are found as labmetal/client.py says.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from labmetal.cli.output import print_json, print_table
from labmetal.cli.parsing import Group
from labmetal.cli.progress import DownloadProgress
from labmetal.client import Client, CliError
from labmetal.names import is_uuid

BUSY = ("starting", "running", "syncing")  # on a seat: its disk is not exported


def _mib(size: int | None) -> str:
    return "-" if size is None else f"{size / 2**20:.1f} MiB"


# -- templates ---------------------------------------------------------------------------
def cmd_template_create(client: Client, args: argparse.Namespace) -> Any:
    body = {"name": args.name, "image": args.image, "description": args.description}
    if args.session_mode:
        body["session_mode"] = args.session_mode
    return client.call("POST", "/v1/templates", json=body)


def cmd_template_set(client: Client, args: argparse.Namespace) -> Any:
    body = {key: value for key, value in (("session_mode", args.session_mode),
                                          ("description", args.description))
            if value is not None}
    if not body:
        raise CliError("nothing to change: give --session-mode or --description")
    return client.call("PATCH", f"/v1/templates/{args.name}", json=body)


def cmd_template_version(client: Client, args: argparse.Namespace) -> Any:
    return client.call("POST", f"/v1/templates/{args.name}/versions", json={
        "image": args.image, "description": args.description})


def cmd_template_list(client: Client, args: argparse.Namespace) -> Any:
    templates = client.call("GET", "/v1/templates")["templates"]
    if args.json:
        return templates
    print_table(["TEMPLATE", "VERSION", "IMAGE", "SIZE", "OWNER", "DESCRIPTION"],
                [[t["name"], str(t["latest_version"] or "-"),
                  (t["versions"][-1]["image"] or "-") if t["versions"] else "-",
                  _mib(t["versions"][-1]["size"]) if t["versions"] else "-", t["owner"] or "",
                  t["description"] or ""] for t in templates])
    return None


def cmd_template_show(client: Client, args: argparse.Namespace) -> Any:
    template = client.call("GET", f"/v1/templates/{args.name}")
    if args.json:
        return template
    print(f"template {template['name']} ({template['uuid']}), owner {template['owner']}, "
          f"sessions {template.get('session_mode', 'auto')}"
          f"{' — ' + template['description'] if template['description'] else ''}")
    # SECURE BOOT: its own kernel was found, so Secure Boot seats boot its sessions too;
    # LOCAL: its sessions can run from the seat's disk (issue 16)
    print_table(["VERSION", "IMAGE", "SIZE", "LOCAL", "SECURE BOOT", "CREATED", "BY"],
                [[str(v["version"]), v["image"] or "-", _mib(v["size"]),
                  "yes" if v.get("local") else "no", "yes" if v.get("secure_boot") else "no",
                  v["created_at"][:19], v["created_by"] or ""] for v in template["versions"]])
    for version in template["versions"]:
        if version.get("local_error"):
            print(f"  v{version['version']} runs diskless only: {version['local_error']}")
    return None


def cmd_template_delete(client: Client, args: argparse.Namespace) -> Any:
    client.call("DELETE", f"/v1/templates/{args.name}")
    if not args.json:
        print(f"template {args.name} deleted")
    return None


def cmd_template_export(client: Client, args: argparse.Namespace) -> Any:
    """Every live session of the template into ``--dir`` as ``<student>.<format>``; those
    in use on a seat are skipped, each with a line saying so."""
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    sessions = client.call("GET", "/v1/sessions", params={"template": args.name})["sessions"]
    out = sys.stderr if args.json else sys.stdout
    exported, skipped, failed = [], [], []
    for ses in sessions:
        who = ses["student"]
        if ses["state"] in BUSY:
            print(f"skipped {who}: session {ses['uuid']} is {ses['state']} on seat "
                  f"{ses['seat']}; stop it, then export it again", file=out)
            skipped.append({"student": who, "session": ses["uuid"], "state": ses["state"],
                            "seat": ses["seat"]})
            continue
        try:
            path = download_disk(client, ses, directory / f"{who}.{args.format}",
                                 {"format": args.format}, who)
        except (CliError, OSError) as error:
            print(f"failed {who}: {error}", file=out)
            failed.append({"student": who, "session": ses["uuid"], "error": str(error)})
            continue
        exported.append({"student": who, "session": ses["uuid"], "file": str(path),
                         "bytes": path.stat().st_size})
        print(f"exported {who}: {path} ({_mib(exported[-1]['bytes'])})", file=out)
    total = sum(e["bytes"] for e in exported)
    print(f"template {args.name}: {len(exported)} of {len(sessions)} session(s) exported "
          f"into {directory} ({_mib(total)}); {len(skipped)} skipped (in use on a seat), "
          f"{len(failed)} failed", file=out)
    result = {"template": args.name, "directory": str(directory), "exported": exported,
              "skipped": skipped, "failed": failed}
    if args.json:
        print_json(result)
    if failed:
        raise CliError(f"{len(failed)} session(s) of {args.name} could not be exported")
    return None


# -- sessions ----------------------------------------------------------------------------
def find_session(client: Client, ident: str, student: str | None,
                 create: bool = False) -> dict[str, Any]:
    """The session named by UUID, or the (caller's or ``student``'s) session of the
    template named ``ident``; made if ``create`` and there is none."""
    if is_uuid(ident):
        return client.call("GET", f"/v1/sessions/{ident}")
    query = {"template": ident, **({"student": student} if student else {})}
    sessions = client.call("GET", "/v1/sessions", params=query)["sessions"]
    if len(sessions) > 1:
        names = ", ".join(sorted({s["student"] for s in sessions}))
        raise CliError(f"several sessions of {ident} ({names}): name the student with "
                       "--student, or the session by its UUID")
    if sessions:
        return sessions[0]
    if not create:
        raise CliError(f"no session of template {ident}"
                       f"{' for ' + student if student else ''}")
    return client.call("POST", "/v1/sessions", json={"template": ident,
                                                     **({"student": student} if student
                                                        else {})})


def cmd_session_list(client: Client, args: argparse.Namespace) -> Any:
    query = {key: value for key, value in (("student", args.student),
                                           ("template", args.template),
                                           ("state", args.state)) if value}
    sessions = client.call("GET", "/v1/sessions", params=query)["sessions"]
    if args.json:
        return sessions
    print_table(["SESSION", "STUDENT", "TEMPLATE", "STATE", "MODE", "SEAT", "USED",
                 "LAST SAVED"],
                [[s["uuid"], s["student"], f"{s['template']} v{s['template_version']}",
                  s["state"], s.get("mode", "iscsi"), s["seat"] or "", _mib(s["used_bytes"]),
                  (s["last_saved_at"] or "")[:19]] for s in sessions])
    for failed in (s for s in sessions if s["last_error"] and s["state"] == "failed"):
        print(f"  {failed['uuid']}: {failed['last_error']}")
    return None


def cmd_session_show(client: Client, args: argparse.Namespace) -> Any:
    return find_session(client, args.session, args.student)


def cmd_session_create(client: Client, args: argparse.Namespace) -> Any:
    body: dict[str, Any] = {"template": args.template}
    if args.student:
        body["student"] = args.student
    if args.version:
        body["version"] = args.version
    return client.call("POST", "/v1/sessions", json=body)


def cmd_session_start(client: Client, args: argparse.Namespace) -> Any:
    ses = find_session(client, args.session, args.student, create=True)
    started = client.call("POST", f"/v1/sessions/{ses['uuid']}/start",
                          json={"seat": args.seat})
    if args.json:
        return started
    target = started["target"]
    print(f"session {started['uuid']} ({started['template']} v{started['template_version']}"
          f", {started['student']}) running on seat {started['seat']}: "
          f"{target['iqn']} on {target['portal']}, LUN {target['lun']}")
    return None


def _action(path: str, body: dict[str, Any] | None = None):
    def run(client: Client, args: argparse.Namespace) -> Any:
        ses = find_session(client, args.session, args.student)
        result = client.call("POST", f"/v1/sessions/{ses['uuid']}/{path}", json=body or {})
        if args.json:
            return result
        print(f"session {ses['uuid']}: {path} done"
              f"{'; state ' + result['state'] if 'state' in result else ''}")
        return None
    return run


def cmd_session_save(client: Client, args: argparse.Namespace) -> Any:
    ses = find_session(client, args.session, args.student)
    save = client.call("POST", f"/v1/sessions/{ses['uuid']}/save", json={"label": args.label})
    if args.json:
        return save
    if "queued" in save:
        print(f"session {ses['uuid']}: {save['message']}")
    else:
        print(f"session {ses['uuid']} saved: #{save['number']} {save['label']}")
    return None


def cmd_session_saves(client: Client, args: argparse.Namespace) -> Any:
    ses = find_session(client, args.session, args.student)
    saves = client.call("GET", f"/v1/sessions/{ses['uuid']}/saves")["saves"]
    if args.json:
        return saves
    print_table(["#", "LABEL", "SAVED", "UUID"],
                [[str(s["number"]), s["label"], s["created_at"][:19], s["uuid"]] for s in saves])
    return None


def cmd_session_revert(client: Client, args: argparse.Namespace) -> Any:
    ses = find_session(client, args.session, args.student)
    result = client.call("POST", f"/v1/sessions/{ses['uuid']}/revert",
                         json={"save": args.save})
    if args.json:
        return result
    print(f"session {ses['uuid']} reverted to save point {args.save}")
    return None


def download_disk(client: Client, ses: dict[str, Any], dest: Path, params: dict[str, str],
                  name: str) -> Path:
    progress = DownloadProgress(name, 0, sys.stderr, verb="download")
    progress.waiting()
    try:
        path = client.download(f"/v1/sessions/{ses['uuid']}/disk", dest, params,
                               progress=progress.update)
    except BaseException:
        if progress.live:  # the error on a line of its own
            progress.out.write("\n")
        raise
    progress.finish()
    return path


def cmd_session_export(client: Client, args: argparse.Namespace) -> Any:
    ses = find_session(client, args.session, args.student)
    params = {"format": args.format}
    if args.save:
        params["save"] = args.save
    if args.compress:
        params["compress"] = "true"
    path = download_disk(client, ses, Path(args.output or "."), params,
                         f"{ses['template']} of {ses['student']}")
    result = {"session": ses["uuid"], "student": ses["student"], "template": ses["template"],
              "save": args.save, "format": args.format, "file": str(path),
              "bytes": path.stat().st_size}
    if args.json:
        return result
    print(f"session {ses['uuid']} ({ses['template']}, {ses['student']})"
          f"{' save point ' + args.save if args.save else ''} written to {path} "
          f"({_mib(result['bytes'])})")
    return None


def cmd_session_delete(client: Client, args: argparse.Namespace) -> Any:
    ses = find_session(client, args.session, args.student)
    client.call("DELETE", f"/v1/sessions/{ses['uuid']}")
    if not args.json:
        print(f"session {ses['uuid']} deleted")
    return None


def register(top: Group) -> None:
    whose = argparse.ArgumentParser(add_help=False)
    whose.add_argument("session", help="the session's UUID, or its template's name")
    whose.add_argument("--student", help="whose session of the template (teachers, admins)")

    template = top.group("template", help="TP templates: frozen versions of an image that "
                                          "sessions start from")
    create = template.command("create", cmd_template_create,
                              help="a template from a whole-disk image (version 1)")
    create.add_argument("name", help="lower-case letters, digits and '-'")
    create.add_argument("--image", required=True, help="an active whole-disk image")
    create.add_argument("--description")
    modes = ("auto", "local", "iscsi")
    create.add_argument("--session-mode", choices=modes,
                        help="local: sessions run from the seat's disk (the template's own "
                             "kernel); iscsi: diskless; auto (default): local where it can")
    change = template.command("set", cmd_template_set, help="change a template's session "
                                                            "mode or description")
    change.add_argument("name")
    change.add_argument("--session-mode", choices=modes)
    change.add_argument("--description")
    version = template.command("version", cmd_template_version,
                               help="a new version from an image; existing sessions keep "
                                    "theirs")
    version.add_argument("name")
    version.add_argument("--image", required=True)
    version.add_argument("--description")
    template.command("list", cmd_template_list,
                     help="the templates and their latest versions")
    template.command("show", cmd_template_show, help="a template and its versions") \
        .add_argument("name")
    template.command("delete", cmd_template_delete, help="a template without sessions") \
        .add_argument("name")
    export = template.command("export", cmd_template_export,
                              help="download the disk of each of its sessions (the class's)")
    export.add_argument("name")
    export.add_argument("--dir", required=True, help="where: one <student>.<format> each")
    export.add_argument("--format", choices=("qcow2", "raw"), default="qcow2")

    session = top.group("session", help="students' sessions of TP templates")
    listing = session.command("list", cmd_session_list, help="sessions (a student sees their "
                                                             "own)")
    listing.add_argument("--student")
    listing.add_argument("--template")
    listing.add_argument("--state", choices=("stopped", "starting", "running", "syncing",
                                             "failed", "deleted"))
    session.command("show", cmd_session_show, parents=(whose,), help="one session")
    create = session.command("create", cmd_session_create, help="a new session of a template")
    create.add_argument("template")
    create.add_argument("--student", help="for this student (admins)")
    create.add_argument("--version", type=int, help="default: the latest")
    session.command("start", cmd_session_start, parents=(whose,),
                    help="start or resume the session on a seat (made if none yet)") \
        .add_argument("--seat", required=True, help="the seat's node name or UUID")
    session.command("stop", _action("stop"), parents=(whose,),
                    help="end it on its seat (data kept)")
    session.command("save", cmd_session_save, parents=(whose,), help="a save point") \
        .add_argument("label")
    session.command("saves", cmd_session_saves, parents=(whose,), help="its save points")
    session.command("revert", cmd_session_revert, parents=(whose,),
                    help="back to a save point (stopped)") \
        .add_argument("save", help="the save point's number, label or UUID")
    session.command("reset", _action("reset"), parents=(whose,),
                    help="back to the template (changes and save points go)")
    session.command("delete", cmd_session_delete, parents=(whose,),
                    help="delete it and its data")
    export = session.command("export", cmd_session_export, parents=(whose,),
                             help="download its disk, or a save point's, as one image file")
    export.add_argument("--save", help="a save point's number, label or UUID")
    export.add_argument("--format", choices=("qcow2", "raw"), default="qcow2")
    export.add_argument("--compress", action="store_true", help="a compressed qcow2")
    export.add_argument("-o", "--output", help="the file, or a directory for the server's "
                                               "name <template>-<student>-<date>.<format> "
                                               "(default: here)")
