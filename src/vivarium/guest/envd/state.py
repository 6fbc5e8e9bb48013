"""What envd knows about its sandbox; set by the host through POST /init."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EnvdState:
    sandbox_id: str = ""
    template_id: str = ""
    env_vars: dict[str, str] = field(default_factory=dict)
    access_token: str | None = None
    default_user: str = "user"
    default_workdir: str | None = None
    identity: bool = False  # whether /init gives the machine its own identity (identity.py)

    def process_env(self) -> dict[str, str]:
        """Environment every process starts with, before the request's own variables."""
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
            "E2B_SANDBOX": "true",
        }
        if self.sandbox_id:
            env["E2B_SANDBOX_ID"] = self.sandbox_id
        if self.template_id:
            env["E2B_TEMPLATE_ID"] = self.template_id
        env.update(self.env_vars)
        return env
