"""The agent's options: the kernel command line (`labmetal.*=`) sets them, its own command
line wins (the agent at work: tests/test_agent.py)."""
from __future__ import annotations

import pytest

from labmetal.agent.main import options

pytestmark = pytest.mark.fast


def test_kernel_command_line_options_and_the_command_line_winning():
    cmdline = ('quiet labmetal.api=http://10.0.0.1:6385 labmetal.mode=discovery '
               'labmetal.interface=eth0,eth1 "labmetal.poweroff_cmd=echo off" labmetal.bogus=1')
    args = options([], cmdline)
    assert (args.api, args.mode, args.interface, args.poweroff_cmd, args.listen) == (
        "http://10.0.0.1:6385", "discovery", ["eth0", "eth1"], "echo off", "0.0.0.0:9999")
    args = options(["--mode", "deploy", "--interface", "eth2"], cmdline)
    assert (args.mode, args.interface) == ("deploy", ["eth2"])

