"""IPMI on a lossy network: labmetal's client beside ipmitool, on the same BMCs and the same
loss, in the same run. N virtual BMCs in a network namespace whose kernel drops a share of
the UDP datagrams each way (lab/network.py add_udp_loss); every BMC is asked its power
state ``--rounds`` times by each client, all BMCs at once, then switched on and off by
each. Prints, per loss and client: calls that succeeded, p50/p95/max seconds per call, and
the ratio of labmetal's failures and p95 to ipmitool's.

    python -m bench.ipmi_loss --nodes 24 --loss 10 20 50 --rounds 5

ipmitool runs as Ironic runs it (`-I lanplus`, its own retries: -R 4, -N 1 unless
``--ipmitool-args`` says otherwise), one process per call; labmetal's client under its
default 15 s deadline. Needs root (network namespace, nftables).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import shlex
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable

from labmetal.conductor.power.base import PowerError, PowerTarget
from labmetal.conductor.power.ipmi import IpmiPower
from labmetal.lab.harness import LABMETAL, Processes
from labmetal.lab.network import Lab, add_udp_loss, in_namespace

SUBNET = "10.99.97"
BMC = f"{SUBNET}.1"
FIRST_PORT = 7000
USER, PASSWORD = "admin", "s3cret"

Call = Callable[[int, str], str | None]  # (port, action) -> None, or the error


def labmetal_call(power: IpmiPower) -> Call:
    def call(port: int, action: str) -> str | None:
        target = PowerTarget(f"n{port}", {"ipmi_address": BMC, "ipmi_port": port,
                                          "ipmi_username": USER, "ipmi_password": PASSWORD})
        try:
            if action == "status":
                power.get_power_state(target)
            else:
                power.set_power_state(target, {"on": "power on", "off": "power off"}[action])
            return None
        except PowerError as error:
            return str(error)
    return call


def ipmitool_call(extra: list[str]) -> Call:
    def call(port: int, action: str) -> str | None:
        result = subprocess.run(["ipmitool", "-I", "lanplus", "-H", BMC, "-p", str(port),
                                 "-U", USER, "-P", PASSWORD, *extra, "power", action],
                                capture_output=True, text=True, timeout=300)
        if result.returncode == 0:
            return None
        return (result.stderr.strip().splitlines() or ["exit status"])[-1]
    return call


def measure(call: Call, ports: list[int], actions: list[str]) -> tuple[list[float], list[str]]:
    seconds: list[float] = []
    errors: list[str] = []

    def one(port: int, action: str) -> None:
        started = time.monotonic()
        error = call(port, action)
        seconds.append(time.monotonic() - started)
        if error:
            errors.append(error)

    with concurrent.futures.ThreadPoolExecutor(len(ports)) as pool:
        for action in actions:  # every BMC at once, one action after the other
            list(pool.map(lambda port: one(port, action), ports))  # noqa: B023
    return seconds, errors


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=24)
    parser.add_argument("--loss", type=float, nargs="+", default=[20.0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ipmitool-args", default="-R 4 -N 1")
    args = parser.parse_args()
    ports = [FIRST_PORT + i for i in range(args.nodes)]
    actions = ["status"] * args.rounds + ["on", "off"]
    clients = {"labmetal": labmetal_call(IpmiPower()),
               "ipmitool": ipmitool_call(shlex.split(args.ipmitool_args))}
    with tempfile.TemporaryDirectory() as workdir, Lab() as lab:
        procs = Processes(Path(workdir))
        try:
            room = lab.add_room("ipmibench", server=f"{BMC}/24")
            lab.add_uplink(room, f"{SUBNET}.2/24")
            proc = procs.start(in_namespace(room.namespace, [
                LABMETAL, "lab", "bmc", "--address", BMC, "--port", str(FIRST_PORT),
                "--count", str(args.nodes), "--user", USER, "--password", PASSWORD]), "bmcs")
            proc.wait_for_output("virtual BMC(s) on", timeout=30)
            print(f"{args.nodes} BMCs, {args.rounds} power reads + on + off each, per client "
                  f"(ipmitool {args.ipmitool_args})")
            print(f"{'loss':>5} {'client':<9} {'ok':>9} {'p50 s':>7} {'p95 s':>7} {'max s':>7}"
                  "  errors")
            for loss in args.loss:
                add_udp_loss(room.namespace, loss)
                figures = {}
                for name, call in clients.items():
                    seconds, errors = measure(call, ports, actions)
                    figures[name] = (len(errors), quantile(seconds, 0.95))
                    common = "; ".join(f"{n}x {text[:70]}"
                                       for text, n in Counter(errors).most_common(2))
                    print(f"{loss:>4.0f}% {name:<9} {len(seconds) - len(errors):>4}/"
                          f"{len(seconds):<4} {quantile(seconds, 0.5):>7.2f} "
                          f"{quantile(seconds, 0.95):>7.2f} {max(seconds):>7.2f}  {common}",
                          flush=True)
                ours, theirs = figures["labmetal"], figures["ipmitool"]
                print(f"{loss:>4.0f}% labmetal/ipmitool: failures {ours[0]}/{theirs[0]}, "
                      f"p95 {ours[1] / theirs[1]:.2f}", flush=True)
        finally:
            procs.stop_all()


if __name__ == "__main__":
    main()
