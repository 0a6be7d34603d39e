"""The conductor's side of the deploy agent's command API (agent/api.py is the other side)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import requests


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
        progress = data.get("progress") or {}
        return cls(id=str(data["id"]), name=data.get("name", ""), status=data["status"],
                   done=int(progress.get("done") or 0), total=int(progress.get("total") or 0),
                   error=data.get("error"), result=data.get("result") or {})


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
            raise AgentRefused(f"agent at {self.url} refused {path}: HTTP "
                               f"{response.status_code} {response.text[:300]}")
        return response.json() if response.content else {}

    def start(self, name: str, params: dict[str, Any], request_id: str) -> AgentCommand:
        return AgentCommand.from_json(self._call("POST", "/v1/commands", {
            "name": name, "params": params, "request_id": request_id}))

    def get(self, command_id: str) -> AgentCommand:
        return AgentCommand.from_json(self._call("GET", f"/v1/commands/{command_id}"))
