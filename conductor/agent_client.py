"""The conductor's side of the deploy agent's command API (agent/api.py is the other side).

A command is sent as its typed params (agent/command_params.py): the class names the
command and spells its JSON, the same class the agent reads it back with.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import requests

from labmetal.agent.command_params import CommandParams


class AgentUnreachable(Exception):
    pass


class AgentRefused(Exception):
    """The agent answered but refused (bad token, busy, bad request): not worth retrying."""


@dataclass
class AgentCommand:
    id: str
    name: str
    status: str  # running | succeeded | failed
    done: int = 0
    total: int = 0
    error: str | None = None
    result: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AgentCommand:
        """Checked: an agent's answer is input from the seat network."""
        try:
            progress = data.get("progress") or {}
            status = data["status"]
            if status not in ("running", "succeeded", "failed"):
                raise ValueError(status)
            result = data.get("result") or {}
            if not isinstance(result, dict):
                raise ValueError("result")
            return cls(id=str(data["id"])[:64], name=str(data.get("name", ""))[:64],
                       status=status, done=int(progress.get("done") or 0),
                       total=int(progress.get("total") or 0),
                       error=None if data.get("error") is None else str(data["error"]),
                       result=result)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise AgentRefused("the agent's answer is not a command's status") from None


class AgentClient:
    def __init__(self, url: str, token: str, timeout: float = 10.0):
        self.url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}
        self.timeout = timeout

    def _call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        try:
            response = requests.request(method, self.url + path, json=body,
                                        headers=self._headers, timeout=self.timeout)
        except requests.RequestException as error:
            raise AgentUnreachable(f"agent at {self.url} does not answer: "
                                   f"{type(error).__name__}") from None
        if response.status_code >= 500:
            raise AgentUnreachable(f"agent at {self.url} failed: HTTP {response.status_code}")
        if response.status_code >= 400:
            # Its body stays out: the seat network is hostile, and a message from it
            # would land in last_error as is.
            raise AgentRefused(f"agent at {self.url} refused {path}: HTTP "
                               f"{response.status_code}")
        if not response.content:
            return {}
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise AgentRefused(f"agent at {self.url} answered {path} with no JSON object")
        return answer

    def start(self, params: CommandParams, request_id: str) -> AgentCommand:
        return AgentCommand.from_json(self._call("POST", "/v1/commands", {
            "name": params.command, "params": params.to_dict(), "request_id": request_id}))

    def get(self, command_id: str) -> AgentCommand:
        return AgentCommand.from_json(self._call("GET", f"/v1/commands/{command_id}"))
