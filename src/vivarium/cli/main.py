"""The `vivarium` command line."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sys
import time
import urllib.parse
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from vivarium.cli import envd
from vivarium.cli.api_client import ApiClient, Endpoints
from vivarium.config import ROLES, Settings
from vivarium.errors import VivariumError


def _settings() -> Settings:
    return Settings.from_env()


def _pairs(values: tuple[str, ...], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{what} must look like KEY=VALUE, got {item!r}")
        out[key] = value
    return out


class _Group(click.Group):
    """Show our errors as one line with the fix, not as a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except VivariumError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)


@click.group(cls=_Group)
def main() -> None:
    """vivarium: self-hosted, E2B-compatible sandboxes on gVisor."""


@main.command()
@click.option("--log-level", default="info", show_default=True)
@click.option("--role", type=click.Choice(ROLES), default=None,
              help="One part of a cluster (default: VIVARIUM_ROLE, else all of it).")  # fmt: skip
def serve(log_level: str, role: str | None) -> None:
    """Run the server in the foreground (Ctrl-C stops it)."""
    from vivarium.serve import serve as run_server

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per envd call is noise
    settings = _settings()
    if role is not None:
        settings = dataclasses.replace(settings, role=role)
        settings.validate()
    asyncio.run(run_server(settings))


@main.command()
def doctor() -> None:
    """Check this host and say how to fix what is missing."""
    from vivarium.cli.doctor import run_checks

    checks = run_checks(_settings())
    for check in checks:
        mark = "ok  " if check.ok else "FAIL"
        click.echo(f"[{mark}] {check.name}: {check.detail}")
        if not check.ok and check.fix:
            click.echo(f"       fix: {check.fix}")
    sys.exit(0 if all(c.ok for c in checks) else 1)


@main.group()
def template() -> None:
    """Build and list templates."""


@template.command("build")
@click.argument("name", default="base")
@click.option("--force", is_flag=True, help="Build again even if up to date (no cached layers).")
@click.option(
    "--dockerfile",
    "-f",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Build NAME as a team template from this Dockerfile, through the API.",
)
@click.option(
    "--context",
    "-c",
    "context",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Where COPY reads from (default: the Dockerfile's directory).",
)
@click.option("--start-cmd", help="Started at build time; running in every sandbox.")
@click.option("--ready-cmd", help="Polled until it succeeds, before the checkpoint.")
@click.option("--cpu", type=int, help="vCPUs of its sandboxes (default: the node's).")
@click.option(
    "--memory-mb", type=int, help="Memory of its sandboxes, in MiB (default: the node's)."
)
def template_build(name: str, force: bool, dockerfile: Path | None, context: Path | None,
                   start_cmd: str | None, ready_cmd: str | None, cpu: int | None,
                   memory_mb: int | None) -> None:  # fmt: skip
    """Build template NAME: a built-in one on this host (no-op when its recipe has not
    changed), or, with --dockerfile, your team's from a Dockerfile (its build's logs stream
    here; steps the layer cache kept are not run again)."""
    from vivarium.templates.recipe import RECIPES

    settings = _settings()
    if dockerfile is not None:
        from vivarium.cli.template_build import build_from_dockerfile

        build_id = build_from_dockerfile(settings, name, dockerfile, context,
                                         start_cmd=start_cmd, ready_cmd=ready_cmd,
                                         skip_cache=force, cpu_count=cpu,
                                         memory_mb=memory_mb)  # fmt: skip
        click.echo(build_id)
        return
    if name not in RECIPES:
        raise click.UsageError(f"{name!r} is not a built-in template ({', '.join(RECIPES)}); "
                               "build a template of your own with --dockerfile")  # fmt: skip
    from vivarium import statedir
    from vivarium.templates.builder import build

    def report(line: str) -> None:
        click.echo(line, err=True)

    statedir.prepare(settings.state_dir)  # a fresh install's first step makes it
    built = asyncio.run(build(settings, name, force=force, report=report))
    click.echo(built.build_id)


@template.command("list")
def template_list() -> None:
    """List built templates."""
    from vivarium.templates.store import TemplateStore

    store = TemplateStore(_settings().templates_root)
    for name in store.names():
        current = store.current(name)
        if current:
            m = current.manifest
            click.echo(f"{name}\t{m['build_id']}\trunsc {m['runsc_version']}\t"
                       f"checkpoint {m['checkpoint_bytes'] >> 20} MiB")  # fmt: skip


@main.group()
def sandbox() -> None:
    """Create, list, run commands in, pause, resume and kill sandboxes (through the API, like
    any client)."""


def _api() -> ApiClient:
    return ApiClient(Endpoints.resolve(_settings()))


@sandbox.command("create")
@click.option("--template", "-t", default="base", show_default=True)
@click.option("--timeout", type=int, help="Seconds until it is killed (default 300).")
@click.option("--metadata", "-m", multiple=True, help="KEY=VALUE, repeatable.")
@click.option("--env", "-e", multiple=True, help="KEY=VALUE, repeatable.")
@click.option("--internet/--no-internet", default=True, show_default=True)
@click.option("--allow-out", multiple=True,
              help="An address, CIDR block or hostname (*.example.com too) it may reach, "
                   "repeatable; with --no-internet, the only ones.")  # fmt: skip
@click.option("--deny-out", multiple=True, help="An address or CIDR block it may not reach.")
@click.option("--auto-pause", is_flag=True, help="Pause at the timeout instead of killing it.")
def sandbox_create(
    template: str, timeout: int | None, metadata: tuple[str, ...], env: tuple[str, ...],
    internet: bool, allow_out: tuple[str, ...], deny_out: tuple[str, ...], auto_pause: bool,
) -> None:  # fmt: skip
    """Create a sandbox; its id is the last line printed."""
    body: dict[str, Any] = {
        "templateID": template, "metadata": _pairs(metadata, "--metadata"),
        "envVars": _pairs(env, "--env"), "allow_internet_access": internet,
        "autoPause": auto_pause,
    }  # fmt: skip
    if allow_out or deny_out:
        body["network"] = {"allowOut": list(allow_out), "denyOut": list(deny_out)}
    if timeout is not None:
        body["timeout"] = timeout
    t0 = time.monotonic()
    with _api() as api:
        created = api.call("POST", "/v2/sandboxes", body)
    click.echo(f"created in {time.monotonic() - t0:.2f}s", err=True)
    click.echo(created["sandboxID"])


@sandbox.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.option("--state", default="running,paused", show_default=True)
@click.option("--metadata", "-m", multiple=True, help="KEY=VALUE filter, repeatable.")
def sandbox_list(as_json: bool, state: str, metadata: tuple[str, ...]) -> None:
    """List sandboxes."""
    params = {"state": state, "metadata": urllib.parse.urlencode(_pairs(metadata, "--metadata"))}
    rows: list[dict[str, Any]] = []
    with _api() as api:
        while True:
            page = api.call("GET", "/v2/sandboxes", params=params)
            rows += page
            token = api.last_next_token
            if not token:
                break
            params["nextToken"] = token
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    click.echo(f"{'SANDBOX ID':<22}{'TEMPLATE':<12}{'STATE':<9}{'ENDS IN':>8}  METADATA")
    for r in rows:
        ends = datetime.fromisoformat(r["endAt"].replace("Z", "+00:00")).timestamp()
        meta = ",".join(f"{k}={v}" for k, v in (r.get("metadata") or {}).items())
        click.echo(f"{r['sandboxID']:<22}{r['templateID']:<12}{r['state']:<9}"
                   f"{max(0, int(ends - time.time())):>7}s  {meta}")  # fmt: skip


@sandbox.command("info")
@click.argument("sandbox_id")
def sandbox_info(sandbox_id: str) -> None:
    """Show one sandbox as JSON."""
    with _api() as api:
        detail = api.call("GET", f"/sandboxes/{sandbox_id}")
    detail.pop("envdAccessToken", None)  # a secret; the CLI fetches it when it needs it
    click.echo(json.dumps(detail, indent=1))


@sandbox.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("sandbox_id")
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--user", "-u", default="user", show_default=True)
@click.option("--cwd")
@click.option("--env", "-e", multiple=True, help="KEY=VALUE, repeatable.")
@click.option("--timeout", type=float, default=60, show_default=True, help="0: none.")
def sandbox_exec(
    sandbox_id: str, cmd: tuple[str, ...], user: str, cwd: str | None, env: tuple[str, ...],
    timeout: float,
) -> None:  # fmt: skip
    """Run CMD in a sandbox (`vivarium sandbox exec ID -- CMD ARGS...`); exits with its code.

    Standard input is passed on when it is not a terminal (`echo hi | vivarium sandbox exec ID
    -- cat`). One argument with spaces runs through `bash -l -c`, like the E2B SDK."""
    with _api() as api:
        headers = api.envd_headers(sandbox_id)
        url, verify = api.endpoints.sandbox_url, api.endpoints.verify
    argv: list[str] | str = cmd[0] if len(cmd) == 1 and " " in cmd[0] else list(cmd)
    stdin = None if sys.stdin.isatty() else sys.stdin.buffer
    # An EnvdError is a VivariumError: printed as one line like the API's errors.
    sys.exit(envd.run(url, headers, argv, user=user, cwd=cwd, envs=_pairs(env, "--env"),
                             stdin=stdin, timeout=timeout or None, verify=verify))  # fmt: skip


@sandbox.command("connect")
@click.argument("sandbox_id")
@click.option("--user", "-u", default="user", show_default=True)
@click.option("--cwd")
def sandbox_connect(sandbox_id: str, user: str, cwd: str | None) -> None:
    """Open an interactive terminal (a login shell on a PTY) in a sandbox."""
    with _api() as api:
        headers = api.envd_headers(sandbox_id)
        url, verify = api.endpoints.sandbox_url, api.endpoints.verify
    sys.exit(envd.terminal(url, headers, user=user, cwd=cwd, verify=verify))


@sandbox.command("kill")
@click.argument("sandbox_ids", nargs=-1, required=True)
def sandbox_kill(sandbox_ids: tuple[str, ...]) -> None:
    """Kill sandboxes."""
    with _api() as api:
        for sandbox_id in sandbox_ids:
            api.call("DELETE", f"/sandboxes/{sandbox_id}")
            click.echo(f"killed {sandbox_id}")


@sandbox.command("pause")
@click.argument("sandbox_ids", nargs=-1, required=True)
def sandbox_pause(sandbox_ids: tuple[str, ...]) -> None:
    """Pause sandboxes: memory, processes and files are kept until they are resumed."""
    with _api() as api:
        for sandbox_id in sandbox_ids:
            t0 = time.monotonic()
            api.call("POST", f"/sandboxes/{sandbox_id}/pause")
            click.echo(f"paused {sandbox_id} in {time.monotonic() - t0:.2f}s")


@sandbox.command("resume")
@click.argument("sandbox_id")
@click.option("--timeout", type=int, default=300, show_default=True,
              help="Seconds until it times out again.")  # fmt: skip
def sandbox_resume(sandbox_id: str, timeout: int) -> None:
    """Resume a paused sandbox where it left off (a running one just gets the new timeout)."""
    t0 = time.monotonic()
    with _api() as api:
        api.call("POST", f"/v2/sandboxes/{sandbox_id}/connect", {"timeout": timeout})
    click.echo(f"resumed {sandbox_id} in {time.monotonic() - t0:.2f}s")


@sandbox.command("timeout")
@click.argument("sandbox_id")
@click.argument("seconds", type=int)
def sandbox_timeout(sandbox_id: str, seconds: int) -> None:
    """Set a sandbox to be killed SECONDS from now."""
    with _api() as api:
        api.call("POST", f"/sandboxes/{sandbox_id}/timeout", {"timeout": seconds})


@main.group()
def keys() -> None:
    """API keys (`X-API-Key`) of your team."""


@keys.command("create")
@click.option("--name", required=True, help="What the key is for.")
@click.option("--team", help="Create this new team and its first key (admin keys only).")
@click.option("--max-sandboxes", type=int, help="With --team: its concurrency limit.")
def keys_create(name: str, team: str | None, max_sandboxes: int | None) -> None:
    """Create a key; it is printed once, as the last line."""
    with _api() as api:
        if team:
            body: dict[str, Any] = {"name": team}
            if max_sandboxes is not None:
                body["maxSandboxes"] = max_sandboxes
            created = api.call("POST", "/teams", body)
            click.echo(f"created team {team!r} ({created['maxSandboxes']} sandboxes at once)",
                       err=True)  # fmt: skip
            click.echo(created["apiKey"])
            return
        created = api.call("POST", "/api-keys", {"name": name})
    click.echo(f"created key {name!r}; store it now, it is not shown again", err=True)
    click.echo(created["key"])


@keys.command("list")
def keys_list() -> None:
    """List your team's keys (names and prefixes; keys themselves are never stored)."""
    with _api() as api:
        rows = api.call("GET", "/api-keys")
    click.echo(f"{'ID':<38}{'NAME':<24}{'PREFIX':<16}CREATED")
    for r in rows:
        click.echo(f"{r['id']:<38}{r['name']:<24}{r['mask']['prefix'] + '...':<16}{r['createdAt']}")


@keys.command("revoke")
@click.argument("key_id")
def keys_revoke(key_id: str) -> None:
    """Revoke one of your team's keys (its ID from `vivarium keys list`)."""
    with _api() as api:
        api.call("DELETE", f"/api-keys/{key_id}")
    click.echo(f"revoked {key_id}")


@main.group()
def node() -> None:
    """The node agents (admin keys only): list them, drain one before maintenance, undrain it."""


@node.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
def node_list(as_json: bool) -> None:
    """Each node with its status, runsc, and what it runs (as of its last heartbeat)."""
    with _api() as api:
        rows = api.call("GET", "/nodes")
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'NODE':<16}{'STATUS':<11}{'SANDBOXES':<11}{'CPUS':<12}{'MEMORY MiB':<18}"
               f"{'RUNSC':<24}HEARTBEAT")  # fmt: skip
    for r in rows:
        cpus = f"{r['allocatedCPUs']:g}/{r['cpuCount']}"
        memory = f"{r['allocatedMemoryMB']}/{r['memoryMB']}"
        sandboxes = f"{r['sandboxes']}/{r['maxSandboxes']}"
        runsc = f"{r['runscVersion']} {r['platform']}"
        click.echo(f"{r['nodeID']:<16}{r['status']:<11}{sandboxes:<11}{cpus:<12}{memory:<18}"
                   f"{runsc:<24}{r['heartbeatAt']}")  # fmt: skip


@node.command("drain")
@click.argument("node_id")
def node_drain(node_id: str) -> None:
    """No new sandboxes on NODE_ID; its running and paused ones stay."""
    _steer(node_id, "drain")


@node.command("undrain")
@click.argument("node_id")
def node_undrain(node_id: str) -> None:
    """NODE_ID takes new sandboxes again."""
    _steer(node_id, "undrain")


def _steer(node_id: str, action: str) -> None:
    with _api() as api:
        row = api.call("POST", f"/nodes/{node_id}/{action}")
    click.echo(f"node {node_id} is {row['status']}")


if __name__ == "__main__":
    main()
