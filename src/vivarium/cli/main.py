"""The `vivarium` command line."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import Any

import click

from vivarium.config import Settings
from vivarium.errors import VivariumError
from vivarium.node.client import NodeClient


def _settings() -> Settings:
    return Settings.from_env()


def _client() -> NodeClient:
    return NodeClient(_settings().node_socket)


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
def serve(log_level: str) -> None:
    """Run the server in the foreground (Ctrl-C stops it)."""
    from vivarium.serve import serve as run_server

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per envd call is noise
    asyncio.run(run_server(_settings()))


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
@click.option("--force", is_flag=True, help="Rebuild even if up to date.")
def template_build(name: str, force: bool) -> None:
    """Build template NAME (no-op when its recipe has not changed)."""
    from vivarium.templates.builder import build

    def report(line: str) -> None:
        click.echo(line, err=True)

    built = asyncio.run(build(_settings(), name, force=force, report=report))
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
    """Create, list, run commands in and kill sandboxes."""


@sandbox.command("create")
@click.option("--template", "-t", default="base", show_default=True)
@click.option("--timeout", type=int, help="Seconds until it is killed (default 300).")
@click.option("--metadata", "-m", multiple=True, help="KEY=VALUE, repeatable.")
@click.option("--env", "-e", multiple=True, help="KEY=VALUE, repeatable.")
@click.option("--internet/--no-internet", default=True, show_default=True)
@click.option("--memory-mb", type=int)
@click.option("--cpus", type=float)
def sandbox_create(
    template: str, timeout: int | None, metadata: tuple[str, ...], env: tuple[str, ...],
    internet: bool, memory_mb: int | None, cpus: float | None,
) -> None:  # fmt: skip
    """Create a sandbox; its id is the last line printed."""
    t0 = time.monotonic()
    with _client() as client:
        record = client.create(
            template=template, timeout=timeout, metadata=_pairs(metadata, "--metadata"),
            env_vars=_pairs(env, "--env"), allow_internet_access=internet,
            memory_mb=memory_mb, cpus=cpus,
        )  # fmt: skip
    click.echo(f"created in {time.monotonic() - t0:.2f}s at {record['slot_address']}", err=True)
    click.echo(record["sandbox_id"])


@sandbox.command("list")
@click.option("--json", "as_json", is_flag=True)
def sandbox_list(as_json: bool) -> None:
    """List running sandboxes."""
    with _client() as client:
        records = client.list_sandboxes()
    if as_json:
        click.echo(json.dumps(records, indent=1))
        return
    click.echo(f"{'SANDBOX ID':<22}{'TEMPLATE':<12}{'ADDRESS':<16}{'ENDS IN':>8}  METADATA")
    for r in records:
        left = max(0, int(r["end_at"] - time.time()))
        meta = ",".join(f"{k}={v}" for k, v in r["metadata"].items())
        click.echo(f"{r['sandbox_id']:<22}{r['template']:<12}{r['slot_address']:<16}"
                   f"{left:>7}s  {meta}")  # fmt: skip


@sandbox.command("info")
@click.argument("sandbox_id")
def sandbox_info(sandbox_id: str) -> None:
    """Show one sandbox as JSON."""
    with _client() as client:
        click.echo(json.dumps(client.get(sandbox_id), indent=1))


@sandbox.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("sandbox_id")
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--user", "-u", default="user", show_default=True)
@click.option("--cwd")
@click.option("--env", "-e", multiple=True, help="KEY=VALUE, repeatable.")
@click.option("--timeout", type=float, default=60, show_default=True)
def sandbox_exec(
    sandbox_id: str, cmd: tuple[str, ...], user: str, cwd: str | None, env: tuple[str, ...],
    timeout: float,
) -> None:  # fmt: skip
    """Run CMD in a sandbox (`vivarium sandbox exec ID -- CMD ARGS...`); exits with its code."""
    with _client() as client:
        result = client.exec(sandbox_id, list(cmd), user=user, cwd=cwd,
                             env=_pairs(env, "--env"), timeout=timeout)  # fmt: skip
    sys.stdout.write(result["stdout"])
    sys.stderr.write(result["stderr"])
    sys.exit(result["exit_code"])


@sandbox.command("kill")
@click.argument("sandbox_ids", nargs=-1, required=True)
def sandbox_kill(sandbox_ids: tuple[str, ...]) -> None:
    """Kill sandboxes."""
    with _client() as client:
        for sandbox_id in sandbox_ids:
            client.kill(sandbox_id)
            click.echo(f"killed {sandbox_id}")


@sandbox.command("timeout")
@click.argument("sandbox_id")
@click.argument("seconds", type=int)
def sandbox_timeout(sandbox_id: str, seconds: int) -> None:
    """Set a sandbox to be killed SECONDS from now."""
    with _client() as client:
        client.set_timeout(sandbox_id, seconds)


if __name__ == "__main__":
    main()
