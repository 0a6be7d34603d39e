"""`labmetal room ...`: rooms, their CSV import, and room jobs with a live per-seat view.

The API and credentials are found as labmetal/client.py says.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from labmetal.cli.output import print_table
from labmetal.cli.parsing import Group
from labmetal.client import Client, CliError

FINISHED_JOB_STATES = ("done", "failed", "cancelled")
BAR_WIDTH = 20


def cmd_list(client: Client, args: argparse.Namespace) -> Any:
    rooms = client.call("GET", "/v1/rooms")["rooms"]
    if args.json:
        return rooms
    print_table(["ROOM", "SEATS", "DESCRIPTION"],
                [[room["name"], str(room["seat_count"]), room["description"] or ""]
                 for room in rooms])
    return None


def cmd_create(client: Client, args: argparse.Namespace) -> Any:
    return client.call("POST", "/v1/rooms", json={"name": args.room,
                                                  "description": args.description})


def cmd_import(client: Client, args: argparse.Namespace) -> Any:
    text = sys.stdin.read() if args.csv == "-" else Path(args.csv).read_text()
    return client.call("POST", f"/v1/rooms/{args.room}/import", data=text.encode(),
                       headers={"Content-Type": "text/csv"})


def cmd_show(client: Client, args: argparse.Namespace) -> Any:
    room = client.call("GET", f"/v1/rooms/{args.room}")
    if args.json:
        return room
    print_room(room, sys.stdout)
    return None


def cmd_deploy(client: Client, args: argparse.Namespace) -> Any:
    body: dict[str, Any] = {"image": args.image, "at": args.at, "repeat": args.repeat,
                            "transport": args.transport, "retries": args.retries}
    if args.seats:
        body["seats"] = args.seats.split(",")
    return _submit(client, args, body)


def cmd_power_off(client: Client, args: argparse.Namespace) -> Any:
    return _submit(client, args, {"action": "power-off", "at": args.at, "repeat": args.repeat})


def cmd_tp(client: Client, args: argparse.Namespace) -> Any:
    """Open the room for a TP (its seats' login goes straight into that session), or close
    it (--end; running sessions go on until their seats are powered off)."""
    if args.end:
        client.call("DELETE", f"/v1/rooms/{args.room}/tp")
        if not args.json:
            print(f"room {args.room}: no TP any more (running sessions go on)")
        return None
    if not args.template:
        raise CliError("name the template (--template T), or --end")
    opened = client.call("PUT", f"/v1/rooms/{args.room}/tp",
                         json={"template": args.template, "power_on": not args.no_power_on})
    if args.json:
        return opened
    print(f"room {args.room} open for TP {opened['tp']['template']}: students log in at a "
          f"seat; {len(opened['powered_on'])} seats powering on")
    if opened.get("cache_job"):
        print(f"  the template goes into the seats' caches first: room job "
              f"{opened['cache_job']} (labmetal room job {opened['cache_job']} --watch)")
    for label, why in sorted(opened["not_powered"].items()):
        print(f"  {label}: not powered on: {why}")
    return None


def _submit(client: Client, args: argparse.Namespace, body: dict[str, Any]) -> Any:
    job = client.call("POST", f"/v1/rooms/{args.room}/jobs", json=body)
    if not args.watch:
        return job
    if not args.json:
        print(f"room job {job['uuid']}: {job['action']} {job['image'] or ''} on "
              f"{args.room}, {len(job['seats'])} seats, at {job['scheduled_at']}")
    return watch(client, job["uuid"], args.json)


def cmd_job(client: Client, args: argparse.Namespace) -> Any:
    if args.watch:
        return watch(client, args.job, args.json)
    return client.call("GET", f"/v1/room-jobs/{args.job}")


def cmd_jobs(client: Client, args: argparse.Namespace) -> Any:
    jobs = client.call("GET", f"/v1/rooms/{args.room}/jobs")["jobs"]
    if args.json:
        return jobs
    print_table(["JOB", "ACTION", "IMAGE", "STATE", "AT", "REPEAT", "SEATS"],
                [[job["uuid"], job["action"], job["image"] or "", job["state"],
                  job["scheduled_at"][:16], job["repeat"] or "", _counts(job)] for job in jobs])
    return None


def cmd_cancel(client: Client, args: argparse.Namespace) -> Any:
    return client.call("POST", f"/v1/room-jobs/{args.job}/cancel")


def cmd_retry(client: Client, args: argparse.Namespace) -> Any:
    job = client.call("POST", f"/v1/room-jobs/{args.job}/seats/{args.seat}/retry")
    return watch(client, job["uuid"], args.json) if args.watch else job


def watch(client: Client, job_uuid: str, as_json: bool, out: TextIO = sys.stdout,
          interval: float = 1.0) -> Any:
    """Redraw the job's seats until it ends; the exit status says whether every seat is done."""
    live = out.isatty() and not as_json
    drawn = 0
    while True:
        job = client.call("GET", f"/v1/room-jobs/{job_uuid}")
        if live:
            if drawn:
                out.write(f"\x1b[{drawn}F\x1b[J")
            drawn = print_job(job, out)
        if job["state"] in FINISHED_JOB_STATES:
            break
        time.sleep(interval)
    if as_json:
        return job
    if not live:
        print_job(job, out)
    if job["state"] != "done":
        raise CliError(f"room job {job['state']}: {job['last_error'] or _counts(job)}")
    return None


def print_job(job: dict[str, Any], out: TextIO) -> int:
    """The job's seat lines; returns how many lines were written (to redraw over them)."""
    lines = [f"{job['action']} {job['image'] or ''} — {job['state']}"
             f"{' via ' + job['chosen_transport'] if job.get('chosen_transport') else ''}"
             f" — {_counts(job)}"]
    for seat in job["seats"]:
        lines.append(_seat_line(seat["label"], seat["state"], seat["progress"],
                                seat["attempts"], seat["error"]))
    out.write("\n".join(lines) + "\n")
    out.flush()
    return len(lines)


def print_room(room: dict[str, Any], out: TextIO) -> None:
    out.write(f"room {room['name']}: {room['seat_count']} seats"
              f"{' — ' + room['description'] if room['description'] else ''}\n")
    if room.get("tp"):
        out.write(f"open for TP {room['tp']['template']} (by {room['tp']['started_by']})\n")
    job = room.get("job")
    if job:
        out.write(f"last job {job['uuid']}: {job['action']} {job['image'] or ''} "
                  f"{job['state']} ({_counts(job)})\n")
    for scheduled in room.get("scheduled", []):
        out.write(f"scheduled {scheduled['uuid']}: {scheduled['action']} "
                  f"{scheduled['image'] or ''} at {scheduled['scheduled_at']}"
                  f"{' every ' + scheduled['repeat'][:-2] if scheduled['repeat'] else ''}\n")
    for seat in room["seats"]:
        node = f"{seat['node_name'] or seat['node_uuid']} ({seat['provision_state']}, " \
               f"{seat['power_state'] or 'power unknown'})"
        student = f"  session of {seat['student']}" if seat.get("student") else ""
        out.write(_seat_line(seat["label"], seat["state"], seat["progress"], seat["attempts"],
                             seat["error"] or seat["last_error"]) + f"  {node}{student}\n")


def _seat_line(label: str, state: str, progress: int, attempts: int, error: str | None) -> str:
    filled = BAR_WIDTH * progress // 100
    bar = "#" * filled + "." * (BAR_WIDTH - filled)
    tries = f" try {attempts}" if attempts > 1 else ""
    reason = f"  {error[:70]}" if error and state in ("failed", "writing", "powering",
                                                       "booting") else ""
    return f"  {label:<8} {state:<10} [{bar}] {progress:3d}%{tries}{reason}"


def _counts(job: dict[str, Any]) -> str:
    return ", ".join(f"{count} {state}" for state, count in sorted(job["counts"].items()))


def register(top: Group) -> None:
    when = argparse.ArgumentParser(add_help=False)
    when.add_argument("--at", help="HH:MM (the next one, lab time) or an ISO time; default now")
    when.add_argument("--repeat", choices=("daily", "weekly"), help="run again every day/week")
    when.add_argument("--watch", action="store_true", help="show each seat live until the end")

    room = top.group("room", help="rooms and room jobs (deploy, power off)")
    room.command("list", cmd_list, help="the rooms")
    create = room.command("create", cmd_create, help="a new, empty room")
    create.add_argument("room")
    create.add_argument("--description")
    imp = room.command("import", cmd_import,
                       help="seats from CSV: seat,name,mac,driver,ipmi_address,ipmi_port,"
                            "ipmi_username,ipmi_password (or wol_host)")
    imp.add_argument("room")
    imp.add_argument("csv", help="CSV file, or - for standard input")
    room.command("show", cmd_show, help="the room's seats and last job").add_argument("room")

    deploy = room.command("deploy", cmd_deploy, parents=(when,), help="image the room's seats")
    deploy.add_argument("room")
    deploy.add_argument("--image", required=True, help="whole-disk or partition image")
    deploy.add_argument("--transport", default="auto", choices=("auto", "unicast", "multicast"))
    deploy.add_argument("--retries", type=int, default=2, help="per failed seat (default 2)")
    deploy.add_argument("--seats", help="only these seats, e.g. A01,A02")
    room.command("power-off", cmd_power_off, parents=(when,), help="power the room off") \
        .add_argument("room")

    tp = room.command("tp", cmd_tp, help="open the room for a TP (or --end)")
    tp.add_argument("room")
    tp.add_argument("--template", help="the TP's template")
    tp.add_argument("--no-power-on", action="store_true", help="leave the seats' power alone")
    tp.add_argument("--end", action="store_true", help="close the TP")

    room.command("jobs", cmd_jobs, help="the room's jobs, newest first").add_argument("room")
    job = room.command("job", cmd_job, help="one room job")
    job.add_argument("job", help="job UUID")
    job.add_argument("--watch", action="store_true")
    room.command("cancel", cmd_cancel, help="cancel a scheduled or running job") \
        .add_argument("job")
    retry = room.command("retry", cmd_retry, help="re-image one seat of a job")
    retry.add_argument("job")
    retry.add_argument("seat", help="seat label")
    retry.add_argument("--watch", action="store_true")
