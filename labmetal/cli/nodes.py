"""`labmetal node ...` and `labmetal conductors`: an admin's node work without OpenStack's
`baremetal` client, through the same /v1 API (reached as labmetal/client.py says).

BMC passwords never appear in the output: the API masks them, and an error message that
happens to contain a secret the user passed is masked here too.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable, TextIO
from urllib.parse import urlsplit

from labmetal.cli.output import print_table
from labmetal.cli.parsing import Group
from labmetal.client import Client, CliError
from labmetal.names import is_uuid
from labmetal.secrets import is_secret_key

# Pinned, so a later API version cannot change what these commands read; 1.78 serves node
# history and the conductors.
API_VERSION = {"X-OpenStack-Ironic-API-Version": "1.78"}
POWER_TARGETS = {"on": "power on", "off": "power off", "reboot": "rebooting"}
SOFT_POWER_TARGETS = {"off": "soft power off", "reboot": "soft rebooting"}
PROVISION_VERBS = ("manage", "provide", "inspect", "deploy", "rebuild", "undeploy", "abort")
DICT_OPTIONS = (("driver_info", "driver_info"), ("property", "properties"),
                ("extra", "extra"), ("instance_info", "instance_info"))
SHOW_FIELDS = ("name", "uuid", "driver", "driver_info", "properties", "instance_info", "extra",
               "description", "deploy_interface", "power_state", "target_power_state",
               "provision_state", "target_provision_state", "provision_updated_at",
               "deploy_step", "conductor", "reservation", "maintenance", "maintenance_reason",
               "fault", "last_error", "created_at", "updated_at")
ERROR_WIDTH = 60


def call(client: Client, method: str, path: str, **kwargs: Any) -> Any:
    return client.call(method, path, headers=API_VERSION, **kwargs)


def all_pages(client: Client, path: str, key: str, params: dict[str, str]) -> list[dict]:
    """Every item of a paginated list, following the API's `next` links."""
    items: list[dict] = []
    while path:
        page = call(client, "GET", path, params=params)
        items += page[key]
        following = urlsplit(page.get("next", ""))
        path, params = (f"{following.path}?{following.query}" if following.path else ""), {}
    return items


# -- nodes -------------------------------------------------------------------------------
def cmd_list(client: Client, args: argparse.Namespace) -> Any:
    params = {key: value for key, value in (
        ("provision_state", args.provision_state), ("driver", args.driver),
        ("conductor", args.conductor), ("fault", args.fault),
        ("maintenance", None if args.maintenance is None else str(args.maintenance).lower()))
        if value is not None}
    nodes = all_pages(client, "/v1/nodes/detail", "nodes", params)
    seats: dict[str, str] = {}
    if args.room:
        room = call(client, "GET", f"/v1/rooms/{args.room}")
        seats = {seat["node_uuid"]: seat["label"] for seat in room["seats"]}
        nodes = sorted((n for n in nodes if n["uuid"] in seats), key=lambda n: seats[n["uuid"]])
    if args.json:
        return nodes
    header = ["NAME", "UUID", "POWER", "PROVISION STATE", "CONDUCTOR", "MAINT", "LAST ERROR"]
    rows = [[node["name"] or "", node["uuid"], _power(node), _provision(node),
             node["conductor"] or "-", "yes" if node["maintenance"] else "",
             _short(node["last_error"])] for node in nodes]
    if args.room:
        header = ["SEAT", *header]
        rows = [[seats[n["uuid"]], *row] for n, row in zip(nodes, rows, strict=True)]
    print_table(header, rows)
    return None


def cmd_show(client: Client, args: argparse.Namespace) -> Any:
    return node_output(client, args, args.node)


def cmd_create(client: Client, args: argparse.Namespace) -> Any:
    body: dict[str, Any] = {"driver": args.driver}
    if args.name:
        body["name"] = args.name
    if args.description:
        body["description"] = args.description
    if args.deploy_interface:
        body["deploy_interface"] = args.deploy_interface
    for option, field in DICT_OPTIONS:
        values = pairs(getattr(args, option))
        if values:
            body[field] = values
    if args.bmc_password_stdin:
        body.setdefault("driver_info", {})["ipmi_password"] = read_secret()
    node = call(client, "POST", "/v1/nodes", json=body)
    try:
        for mac in args.mac:
            call(client, "POST", "/v1/ports", json={"address": mac, "node_uuid": node["uuid"]})
    except CliError as error:  # all or nothing: no node left behind without its port
        call(client, "DELETE", f"/v1/nodes/{node['uuid']}")
        raise CliError(f"node not created: {error}") from None
    return node_output(client, args, node["uuid"])


def cmd_set(client: Client, args: argparse.Namespace) -> Any:
    node = call(client, "GET", f"/v1/nodes/{args.node}")
    patch: list[dict[str, Any]] = []
    for field in ("name", "driver", "description", "deploy_interface"):
        if getattr(args, field) is not None:
            patch.append({"op": "add", "path": f"/{field}", "value": getattr(args, field)})
    for option, field in DICT_OPTIONS:
        patch += dict_patch(node, field, pairs(getattr(args, option)))
    if args.bmc_password_stdin:
        patch += dict_patch(node, "driver_info", {"ipmi_password": read_secret()})
    patch += [{"op": "remove", "path": "/" + path.strip("/")} for path in args.unset]
    if not patch:
        raise CliError("nothing to change: give --name, --driver-info KEY=VALUE, --property "
                       "KEY=VALUE, --unset FIELD[/KEY], ...")
    call(client, "PATCH", f"/v1/nodes/{node['uuid']}", json=patch)
    return node_output(client, args, node["uuid"])


def dict_patch(node: dict[str, Any], field: str, values: dict[str, str]) -> list[dict]:
    """Patch operations setting keys of a JSON-object field; an empty field is set whole
    (JSON patch cannot add a member to a null)."""
    if not values:
        return []
    if not node.get(field):
        return [{"op": "add", "path": f"/{field}", "value": values}]
    return [{"op": "add", "path": f"/{field}/{key}", "value": value}
            for key, value in values.items()]


def cmd_delete(client: Client, args: argparse.Namespace) -> Any:
    for node in args.nodes:
        call(client, "DELETE", f"/v1/nodes/{node}")
        if not args.json:
            print(f"node {node} deleted")
    return {"deleted": args.nodes} if args.json else None


def cmd_power(client: Client, args: argparse.Namespace) -> Any:
    targets = SOFT_POWER_TARGETS if args.soft else POWER_TARGETS
    if args.action not in targets:
        raise CliError(f"there is no soft '{args.action}'")
    call(client, "PUT", f"/v1/nodes/{args.node}/states/power",
         json={"target": targets[args.action]})
    if args.wait is not None:
        node = wait(client, args.node, args.wait, sys.stderr,
                    done=lambda n: not n["target_power_state"] and not n["reservation"],
                    describe=lambda n, event: f"{_power(n)} — {event}")
        expected = "power off" if args.action == "off" else "power on"
        if node["last_error"] or node["power_state"] != expected:
            raise CliError(f"node {args.node} is {node['power_state']}: "
                           f"{node['last_error'] or 'not ' + expected}")
    return state_output(client, args)


def cmd_provision(client: Client, args: argparse.Namespace) -> Any:
    if args.image:
        if args.verb not in ("deploy", "rebuild"):
            raise CliError("--image goes with deploy or rebuild")
        node = call(client, "GET", f"/v1/nodes/{args.node}")
        call(client, "PATCH", f"/v1/nodes/{node['uuid']}",
             json=dict_patch(node, "instance_info", {"image_source": args.image}))
    call(client, "PUT", f"/v1/nodes/{args.node}/states/provision", json={"target": args.verb})
    if args.wait is not None:
        expected = call(client, "GET", f"/v1/nodes/{args.node}")["target_provision_state"]
        node = wait(client, args.node, args.wait, sys.stderr,
                    done=lambda n: not n["target_provision_state"] and not n["reservation"],
                    describe=_provision_line)
        failed = node["last_error"] and args.verb != "abort"  # abort leaves its reason
        if failed or (expected and node["provision_state"] != expected):
            raise CliError(f"node {args.node} is {node['provision_state']}: "
                           f"{node['last_error'] or 'not ' + expected}")
    return state_output(client, args)


def cmd_maintenance(client: Client, args: argparse.Namespace) -> Any:
    if args.state == "on":
        call(client, "PUT", f"/v1/nodes/{args.node}/maintenance",
             json={"reason": args.reason} if args.reason else {})
    else:
        call(client, "DELETE", f"/v1/nodes/{args.node}/maintenance")
    return state_output(client, args)


def cmd_history(client: Client, args: argparse.Namespace) -> Any:
    events = call(client, "GET", f"/v1/nodes/{args.node}/history",
                  params={"detail": "true"})["history"]
    if args.json:
        return events
    print_table(["TIME", "SEVERITY", "TYPE", "USER", "EVENT"],
                [[e["created_at"][:19].replace("T", " "), e["severity"], e["event_type"] or "",
                  e["user"] or "", e["event"]] for e in events])
    return None


# -- ports -------------------------------------------------------------------------------
def cmd_port_list(client: Client, args: argparse.Namespace) -> Any:
    path = f"/v1/nodes/{args.node}/ports/detail" if args.node else "/v1/ports/detail"
    ports = all_pages(client, path, "ports", {})
    if args.json:
        return ports
    names = {n["uuid"]: n["name"] for n in all_pages(client, "/v1/nodes", "nodes",
                                                      {"fields": "uuid,name"})}
    print_table(["UUID", "ADDRESS", "NODE", "PXE"],
                [[p["uuid"], p["address"], names.get(p["node_uuid"]) or p["node_uuid"],
                  "yes" if p["pxe_enabled"] else "no"] for p in ports])
    return None


def cmd_port_create(client: Client, args: argparse.Namespace) -> Any:
    port = call(client, "POST", "/v1/ports", json={"address": args.mac, "node_uuid": args.node,
                                                   "pxe_enabled": not args.no_pxe})
    if args.json:
        return port
    print(f"port {port['address']} ({port['uuid']}) added to node {args.node}")
    return None


def cmd_port_delete(client: Client, args: argparse.Namespace) -> Any:
    """A port is named by its UUID or its MAC address."""
    ident = args.port
    if not is_uuid(ident):
        found = call(client, "GET", "/v1/ports", params={"address": ident})["ports"]
        if not found:
            raise CliError(f"no port with MAC address {ident}")
        ident = found[0]["uuid"]
    call(client, "DELETE", f"/v1/ports/{ident}")
    if not args.json:
        print(f"port {args.port} deleted")
    return {"deleted": args.port} if args.json else None


# -- conductors --------------------------------------------------------------------------
def cmd_conductor_list(client: Client, args: argparse.Namespace) -> Any:
    conductors = call(client, "GET", "/v1/conductors", params={"detail": "true"})["conductors"]
    if args.json:
        return conductors
    print_table(["HOSTNAME", "ALIVE", "DRIVERS", "LAST HEARTBEAT"],
                [[c["hostname"], "yes" if c["alive"] else "no", ",".join(c["drivers"]),
                  (c["updated_at"] or "")[:19].replace("T", " ")] for c in conductors])
    return None


# -- waiting -----------------------------------------------------------------------------
def wait(client: Client, node: str, timeout: float, out: TextIO,
         done: Callable[[dict[str, Any]], bool], describe: Callable[[dict[str, Any], str], str],
         interval: float = 1.0) -> dict[str, Any]:
    """Poll the node until ``done``, showing one live line (``describe``) on a terminal, or
    a line per change otherwise. A timeout of 0 waits as long as it takes."""
    started = time.monotonic()
    live, last = out.isatty(), ""
    while True:
        current = call(client, "GET", f"/v1/nodes/{node}")
        events = call(client, "GET", f"/v1/nodes/{node}/history")["history"]
        line = f"{node}: {describe(current, events[-1]['event'] if events else '')}"
        if live:
            out.write(f"\r{line[:150]} [{time.monotonic() - started:.0f} s]\x1b[K")
        elif line != last:
            out.write(line + "\n")
        out.flush()
        last = line
        if done(current):
            if live:
                out.write("\n")
            return current
        if timeout and time.monotonic() - started > timeout:
            if live:
                out.write("\n")
            raise CliError(f"timed out after {timeout:.0f} s: node {node} is still "
                           f"{_provision(current)}, {_power(current)}")
        time.sleep(interval)


def _provision_line(node: dict[str, Any], event: str) -> str:
    step = node.get("deploy_step") or {}
    progress = ""
    if step.get("total"):
        percent = 100 * int(step.get("done") or 0) // int(step["total"])
        progress = f" {step.get('step', '')} {percent}%"
    return f"{_provision(node)}{progress} — {event}"


# -- output ------------------------------------------------------------------------------
def node_output(client: Client, args: argparse.Namespace, ident: str) -> Any:
    """The node as --json returns it, or its fields and ports for a person."""
    node = call(client, "GET", f"/v1/nodes/{ident}")
    if args.json:
        return node
    ports = call(client, "GET", f"/v1/nodes/{node['uuid']}/ports")["ports"]
    rows = [[key, _value(node[key])] for key in SHOW_FIELDS]
    print_table(["FIELD", "VALUE"], [*rows, ["ports", ", ".join(p["address"] for p in ports)]])
    return None


def state_output(client: Client, args: argparse.Namespace) -> Any:
    """After an action: the node for --json, else its states on one line."""
    node = call(client, "GET", f"/v1/nodes/{args.node}")
    if args.json:
        return node
    maintenance = f", maintenance: {node['maintenance_reason'] or 'yes'}" \
        if node["maintenance"] else ""
    error = f"; last error: {node['last_error']}" if node["last_error"] else ""
    print(f"node {node['name'] or node['uuid']}: {_provision(node)}, {_power(node)}"
          f"{maintenance}{error}")
    return None


def _value(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{key}={_value(item)}" for key, item in value.items())
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "" if value is None else str(value)


def _power(node: dict[str, Any]) -> str:
    state = node["power_state"] or "unknown"
    return f"{state} -> {node['target_power_state']}" if node["target_power_state"] else state


def _provision(node: dict[str, Any]) -> str:
    target = node["target_provision_state"]
    return f"{node['provision_state']} -> {target}" if target else node["provision_state"]


def _short(text: str | None) -> str:
    text = (text or "").replace("\n", " ")
    return text if len(text) <= ERROR_WIDTH else text[:ERROR_WIDTH - 3] + "..."


# -- arguments ---------------------------------------------------------------------------
def pairs(items: list[str]) -> dict[str, str]:
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"expected KEY=VALUE, got {key!r}" + ("=..." if sep else ""))
        values[key] = value
    return values


def read_secret() -> str:
    secret = sys.stdin.readline().rstrip("\n")
    if not secret:
        raise CliError("no password on standard input")
    return secret


def secrets_given(args: argparse.Namespace) -> list[str]:
    """Values of secret-looking KEY=VALUE options, to keep them out of error messages."""
    found = []
    for option, _ in DICT_OPTIONS:
        for item in getattr(args, option, None) or []:
            key, _, value = item.partition("=")
            if is_secret_key(key) and value:
                found.append(value)
    return found


def register(top: Group) -> None:
    """Add ``labmetal node ...`` and ``labmetal conductors``."""
    one = argparse.ArgumentParser(add_help=False)
    one.add_argument("node", help="node name or UUID")
    waits = argparse.ArgumentParser(add_help=False)
    waits.add_argument("--wait", type=float, nargs="?", const=0, metavar="SECONDS",
                       help="wait until done, showing its progress (optionally at most "
                            "SECONDS)")
    fields = argparse.ArgumentParser(add_help=False)
    fields.add_argument("--driver-info", action="append", default=[], metavar="KEY=VALUE",
                        help="e.g. ipmi_address=10.0.0.21, ipmi_port, ipmi_username, "
                             "wol_host, deploy_kernel (repeatable)")
    fields.add_argument("--bmc-password-stdin", action="store_true",
                        help="driver_info ipmi_password from standard input's first line "
                             "(so it is not on the command line)")
    fields.add_argument("--property", action="append", default=[], metavar="KEY=VALUE")
    fields.add_argument("--extra", action="append", default=[], metavar="KEY=VALUE")
    fields.add_argument("--instance-info", action="append", default=[], metavar="KEY=VALUE",
                        help="e.g. image_source=debian12")
    fields.add_argument("--description")
    fields.add_argument("--deploy-interface", choices=("direct", "iscsi"))

    node = top.group("node", help="nodes (admins): enroll, power, provision, maintenance, "
                                  "ports, history")
    listing = node.command("list", cmd_list, help="the nodes, one line each")
    listing.add_argument("--provision-state", help="e.g. available, 'deploy failed'")
    listing.add_argument("--driver")
    listing.add_argument("--conductor", help="nodes this conductor owns")
    listing.add_argument("--fault", help="e.g. 'power failure'")
    listing.add_argument("--maintenance", action=argparse.BooleanOptionalAction)
    listing.add_argument("--room", help="the room's seats only, by seat")
    node.command("show", cmd_show, parents=(one,), help="one node's fields and ports")
    create = node.command("create", cmd_create, parents=(fields,), hide=secrets_given,
                          help="enroll a node (state enroll), with its ports")
    create.add_argument("name", nargs="?")
    create.add_argument("--driver", required=True, help="ipmi or wol")
    create.add_argument("--mac", action="append", default=[],
                        help="a port's MAC address (repeatable)")
    change = node.command("set", cmd_set, parents=(one, fields), hide=secrets_given,
                          help="change fields (JSON patch)")
    change.add_argument("--name")
    change.add_argument("--driver")
    change.add_argument("--unset", action="append", default=[], metavar="FIELD[/KEY]",
                        help="e.g. description, properties/cpus (repeatable)")
    remove = node.command("delete", cmd_delete, help="delete nodes (enroll, manageable, "
                          "available, failed states, or in maintenance)")
    remove.add_argument("nodes", nargs="+", metavar="node")

    power = node.command("power", cmd_power, parents=(one, waits),
                         help="power on, off or reboot")
    power.add_argument("action", choices=sorted(POWER_TARGETS))
    power.add_argument("--soft", action="store_true", help="soft off / soft reboot")
    provision = node.command("provision", cmd_provision, parents=(one, waits),
                             help="Ironic's verbs: " + ", ".join(PROVISION_VERBS))
    provision.add_argument("verb", choices=PROVISION_VERBS)
    provision.add_argument("--image", help="deploy/rebuild: set instance_info image_source")
    maintenance = node.command("maintenance", cmd_maintenance, parents=(one,),
                               help="set or clear maintenance (the conductor leaves it be)")
    maintenance.add_argument("state", choices=("on", "off"))
    maintenance.add_argument("--reason")
    node.command("history", cmd_history, parents=(one,), help="the node's events, oldest first")

    port = node.group("port", help="network ports: the MACs a node PXE-boots from")
    port.command("list", cmd_port_list, help="ports, of one node or all") \
        .add_argument("node", nargs="?")
    port_create = port.command("create", cmd_port_create, parents=(one,),
                               help="add a port to a node")
    port_create.add_argument("mac")
    port_create.add_argument("--no-pxe", action="store_true", help="not a PXE-boot port")
    port.command("delete", cmd_port_delete, help="remove a port") \
        .add_argument("port", help="UUID or MAC address")

    # `labmetal conductor` runs a conductor; the list is `labmetal conductors`.
    top.command("conductors", cmd_conductor_list, help="the conductors, alive or not (admins)")
