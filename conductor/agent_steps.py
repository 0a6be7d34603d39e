"""One step of a deploy, clean or capture run on the node's agent: start its command (or find
it again after a takeover), wait for its end while saving its progress in the node's
deploy_step, and turn whatever goes wrong into a DeployError, the node's last_error.

Both the deploy flows (conductor/deploy.py) and the deploy interfaces
(conductor/deploy_interfaces.py) run their agent commands through here; the commands'
params are the agent's own typed classes (agent/command_params.py).
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from labmetal.agent.command_params import CommandParams
from labmetal.conductor.agent_client import AgentClient, AgentRefused, AgentUnreachable
from labmetal.models import Node

if TYPE_CHECKING:
    from labmetal.conductor.actions import NodeWork


class DeployError(Exception):
    """A step failed; the message becomes the node's last_error."""


def _agent(work: NodeWork) -> AgentClient:
    node = work.node
    if not node.agent_url or not node.agent_token:
        raise DeployError("the agent has not reported where it listens")
    check_trusted(work)
    return AgentClient(node.agent_url, work.ctx.box.open(node.agent_token))


def check_trusted(work: NodeWork) -> None:
    """A second lookup of this deploy's token raised an alarm (api/agent.py): whatever the
    agent says from now on may come from someone else."""
    with work.ctx.db.read() as session:
        alarm = session.scalar(select(Node.agent_alarm).where(Node.id == work.node.id))
    if alarm:
        raise DeployError(alarm)


def agent_says(text: object, limit: int = 200) -> str:
    """An agent's words for last_error and the history: its message, but printable, short,
    and marked as its own (the seat network is hostile: a seat's text is data)."""
    cleaned = "".join(ch if ch.isprintable() else " " for ch in str(text or ""))
    cleaned = " ".join(cleaned.split())
    if len(cleaned) > limit:
        cleaned = cleaned[:limit] + "..."
    return f"the agent reports: {cleaned!r}" if cleaned else "the agent gave no reason"


def run_agent_command(work: NodeWork, params: CommandParams, step: str, wait: bool = True,
                      key: str = "") -> dict[str, Any]:
    """Start (or find again, after a takeover) an agent command and wait for its end,
    saving progress. An agent that stops answering for agent_timeout fails the step.
    ``wait=False`` is for reboot and power off: accepted is all one can know, since the
    agent is gone (or a new one, with a new token, answers) once it has acted. ``key``
    makes the command a new one where re-sending the same would be wrong (a challenge:
    a conductor that took over asks its own)."""
    ctx = work.ctx
    name = params.command
    client = _agent(work)
    step_id = (work.node.deploy_step or {}).get("id") or work.node.uuid
    timeout = ctx.settings.agent_timeout
    last_answer = time.monotonic()
    command = None
    saved_at = 0.0
    while True:
        try:
            command = (client.start(params, f"{step_id}:{name}{key}") if command is None
                       else client.get(command.id))
            last_answer = time.monotonic()
        except AgentRefused as error:
            raise DeployError(str(error)) from None
        except AgentUnreachable as error:
            if time.monotonic() - last_answer > timeout:
                raise DeployError(f"the agent vanished during {name}: no answer for "
                                  f"{timeout:.0f} s ({error})") from None
            time.sleep(1.0)
            continue
        if not wait:
            return command.result
        if command.status == "succeeded":
            check_trusted(work)
            ctx.save_step(work.node.id, {**(work.node.deploy_step or {}), "step": step,
                                         "done": command.total or command.done,
                                         "total": command.total})
            return command.result
        if command.status == "failed":
            raise DeployError(f"{name} failed on the node: {agent_says(command.error)}")
        if time.monotonic() - saved_at >= 1.0:
            ctx.save_step(work.node.id, {**(work.node.deploy_step or {}), "step": step,
                                         "done": command.done, "total": command.total})
            saved_at = time.monotonic()
        time.sleep(0.5)
