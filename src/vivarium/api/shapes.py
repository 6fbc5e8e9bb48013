"""E2B's JSON shapes: request bodies in (validated, with errors that name the field) and
catalog rows out (`Sandbox`, `SandboxDetail`, `ListedSandbox`, `SnapshotInfo`,
`SandboxMetric`)."""

from __future__ import annotations

import base64
import binascii
import re
import time
import urllib.parse
from datetime import UTC, datetime
from typing import Any

from vivarium.api import nodes
from vivarium.api.control import NewSandbox, rules_of
from vivarium.api.volumes import mounts_request
from vivarium.errors import InvalidArgument
from vivarium.httpjson import env_map, str_map, typed, whole_number
from vivarium.network import egress
from vivarium.network.egress import Egress

Row = dict[str, Any]
MAX_METADATA = 64  # entries; E2B does not publish one, this keeps rows small
MAX_LIMIT = 100
STATES = ("running", "paused")
# The catalog's states in between, as E2B's two (the clients refuse any other): a pause under
# way is paused, a start or resume under way is running.
WIRE_STATES = {"pausing": "paused", "starting": "running"}


def rfc3339(ts: float) -> str:
    """E2B's REST times; envd's Connect messages use protobuf's form instead
    (guest/envd/entry_info.protobuf_timestamp)."""
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def parse_time(value: str, what: str) -> float:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise InvalidArgument(
            f"{what} must be an RFC 3339 time, e.g. 2026-01-02T15:04:05Z"
        ) from None


# -- requests ----------------------------------------------------------------------------------


IDEMPOTENCY_KEY = re.compile(r"[a-z0-9-]{1,255}")  # what the clients allow


def new_sandbox(data: dict[str, Any], default_timeout: int, *, v1: bool,
                idempotency_key: str | None = None) -> NewSandbox:  # fmt: skip
    """A create's body; `idempotency_key`, its Idempotency-Key header."""
    if idempotency_key is not None and not IDEMPOTENCY_KEY.fullmatch(idempotency_key):
        raise InvalidArgument("Idempotency-Key must be 1-255 lowercase letters, digits or '-'")
    template = typed(data, "templateID", str)
    if not template:
        raise InvalidArgument("templateID is required")
    timeout = typed(data, "timeout", int, default_timeout)
    metadata = str_map(data, "metadata")
    if len(metadata) > MAX_METADATA:
        raise InvalidArgument(f"metadata has more than {MAX_METADATA} entries")
    _unsupported(data, "mcp", "MCP gateways")
    _unsupported(data, "iam", "IAM credentials (iam)")
    network = typed(data, "network", dict, {})
    _unsupported(network, "httpsPorts", "TLS to a sandbox's ports (network.httpsPorts)")
    _unsupported(network, "maskRequestHost", "Host rewriting (network.maskRequestHost)")
    rules = egress.parse(network, typed(data, "allow_internet_access", bool, True), "network")
    public_traffic = typed(network, "allowPublicTraffic", bool, True)
    secure = typed(data, "secure", bool, True) if v1 else True
    if not public_traffic and not secure:
        raise InvalidArgument("network.allowPublicTraffic=false needs a secure sandbox")
    auto_pause = typed(data, "autoPause", bool, False)
    auto_resume = typed(typed(data, "autoResume", dict, {}), "enabled", bool, False)
    if auto_resume and not auto_pause:
        raise InvalidArgument("autoResume needs autoPause: only a sandbox that pauses at its "
                              "timeout can be resumed by traffic")  # fmt: skip
    auto_pause_memory = typed(data, "autoPauseMemory", bool, True)
    if auto_resume and not auto_pause_memory:
        raise InvalidArgument("autoResume needs an auto-pause that keeps memory: a sandbox "
                              "paused with its files only starts afresh, so traffic cannot "
                              "wake it transparently")  # fmt: skip
    return NewSandbox(
        template=template,
        timeout_s=timeout,
        metadata=metadata,
        env_vars=env_map(data, "envVars"),
        auto_pause=auto_pause,
        auto_resume=auto_resume,
        egress=rules,
        # v2 sandboxes always secure envd; v1 clients could opt out.
        secure=secure,
        public_traffic=public_traffic,
        volume_mounts=mounts_request(data.get("volumeMounts")),
        auto_pause_memory=auto_pause_memory,
        idempotency_key=idempotency_key,
    )


def network_update(data: dict[str, Any]) -> Egress:
    """The rules of `SandboxNetworkUpdateConfig`: they replace all of the sandbox's, so what is
    left out is cleared (internet access included, which is then on)."""
    return egress.parse(data, typed(data, "allow_internet_access", bool, True), "body")


def snapshot_request(data: dict[str, Any]) -> tuple[str | None, bool]:
    """(name, whether memory is kept) of a new snapshot (`SandboxSnapshotRequest`)."""
    name = typed(data, "name", str)
    return name or None, typed(data, "memory", bool, True)


def fork_request(data: dict[str, Any], default_timeout: int) -> tuple[int, int]:
    """(count, timeout) of `SandboxForkRequest`."""
    return typed(data, "count", int, 1), typed(data, "timeout", int, default_timeout)


def _unsupported(data: dict[str, Any], key: str, what: str) -> None:
    if data.get(key):
        raise InvalidArgument(f"{what}: not supported by this server")


def list_query(params: Any) -> tuple[list[str], dict[str, str], int, str | None]:
    """(states, metadata filter, limit, next token) from `GET /v2/sandboxes`' query."""
    states = [s for s in (params.get("state") or "running,paused").split(",") if s]
    for state in states:
        if state not in STATES:
            raise InvalidArgument(f"unknown state {state!r}", "use running or paused")
    # The clients quote each key and value, then encode the whole as one parameter: twice.
    pairs = urllib.parse.parse_qsl(params.get("metadata") or "", keep_blank_values=True)
    metadata = {urllib.parse.unquote(k): urllib.parse.unquote(v) for k, v in pairs}
    return states, metadata, *paging(params)


def paging(params: Any) -> tuple[int, str | None]:
    """(limit, next token) of a paged list's query."""
    limit = whole_number(params.get("limit"), "limit", MAX_LIMIT, MAX_LIMIT)
    if limit < 1:
        raise InvalidArgument(f"limit must be 1..{MAX_LIMIT}")
    return limit, params.get("nextToken") or None


def event_query(params: Any) -> tuple[int, int]:
    """(after id, limit) of an events query: `after` is the last id already read."""
    after = whole_number(params.get("after"), "after (an event id)", 0)
    limit, _ = paging(params)
    return after, limit


MAX_METRIC_IDS = 100


def sandbox_ids(params: Any) -> list[str]:
    """`sandbox_ids` of `GET /sandboxes/metrics`: comma-separated, 1..100 of them."""
    ids = [i for i in (params.get("sandbox_ids") or "").split(",") if i]
    if not 1 <= len(ids) <= MAX_METRIC_IDS:
        raise InvalidArgument(
            f"sandbox_ids must name 1..{MAX_METRIC_IDS} sandboxes, comma-separated"
        )
    return ids


def time_range(params: Any) -> tuple[int | None, int | None]:
    """`start` and `end` of a metrics query: unix seconds, either one optional."""
    bounds: list[int | None] = []
    for name in ("start", "end"):
        raw = params.get(name)
        bounds.append(None if raw in (None, "") else whole_number(raw, f"{name} (unix seconds)", 0))
    start, end = bounds
    if start is not None and end is not None and start > end:
        raise InvalidArgument(f"start ({start}) is after end ({end})")
    return start, end


def page(
    rows: list[Row], limit: int, token: str | None, *, ascending: bool = False,
    by: str = "started_at",
) -> tuple[list[Row], str | None]:  # fmt: skip
    """Keyset paging by a time (`by`: newest first unless `ascending`), then id: the token
    names the last row returned."""
    sign = 1 if ascending else -1
    rows = sorted(rows, key=lambda r: (sign * r[by], r["id"]))
    if token:
        try:
            started, _, last_id = base64.urlsafe_b64decode(token.encode()).decode().partition("|")
            cursor = (sign * float(started), last_id)
        except (ValueError, binascii.Error, UnicodeDecodeError):
            raise InvalidArgument("nextToken is not valid: pass the x-next-token you got") from None
        rows = [r for r in rows if (sign * r[by], r["id"]) > cursor]
    chunk = rows[:limit]
    if len(rows) <= limit:
        return chunk, None
    last = chunk[-1]
    return chunk, base64.urlsafe_b64encode(f"{last[by]!r}|{last['id']}".encode()).decode()


def matches(row: Row, metadata: dict[str, str]) -> bool:
    return all(row["metadata"].get(k) == v for k, v in metadata.items())


# -- responses ---------------------------------------------------------------------------------


def sandbox(row: Row, token: str | None, client_id: str, traffic: str | None,
            domain: str) -> Row:  # fmt: skip
    """`Sandbox`: what create and connect answer."""
    return {"templateID": row["template_id"], "sandboxID": row["id"], "clientID": client_id,
            "envdVersion": row["envd_version"], "alias": row["template_id"],
            "envdAccessToken": token, "trafficAccessToken": traffic, "domain": domain}  # fmt: skip


def listed(row: Row, client_id: str, names: dict[str, str] | None = None) -> Row:
    """`ListedSandbox`; `names`: the team's templates' names by id (`alias`, the client's
    `SandboxInfo.name`)."""
    alias = (names or {}).get(row["template_id"], row["template_id"])
    return {"templateID": row["template_id"], "alias": alias, "sandboxID": row["id"],
            "clientID": client_id, "startedAt": rfc3339(row["started_at"]),
            "endAt": rfc3339(row["end_at"]), "cpuCount": row["cpu_count"],
            "memoryMB": row["memory_mb"], "diskSizeMB": row["disk_mb"],
            "state": WIRE_STATES.get(row["state"], row["state"]),
            "envdVersion": row["envd_version"], "metadata": row["metadata"],
            "volumeMounts": [{"name": m["name"], "path": m["path"]}
                             for m in row["volume_mounts"]]}  # fmt: skip


def detail(row: Row, token: str | None, client_id: str, domain: str,
           names: dict[str, str] | None = None) -> Row:  # fmt: skip
    """`SandboxDetail`."""
    return {**listed(row, client_id, names), "envdAccessToken": token, "domain": domain,
            "allowInternetAccess": row["allow_internet"],
            "network": {**rules_of(row).wire(), "allowPublicTraffic": row["public_traffic"]},
            "lifecycle": {"autoResume": row["auto_resume"],
                          "onTimeout": "pause" if row["auto_pause"] else "kill"}}  # fmt: skip


def snapshot_info(row: Row) -> Row:
    """`SnapshotInfo`: what create_snapshot and list_snapshots answer."""
    return {"snapshotID": row["id"], "names": [row["name"]] if row["name"] else []}


def metric(data: dict[str, Any]) -> Row:
    """A sample (node/metrics_history.py) -> `SandboxMetric`."""
    ts = float(data.get("ts") or time.time())
    return {"timestamp": rfc3339(ts), "timestampUnix": int(ts),
            "cpuCount": int(data.get("cpu_count", 0)),
            "cpuUsedPct": float(data.get("cpu_used_pct", 0.0)),
            "memUsed": int(data.get("mem_used", 0)), "memTotal": int(data.get("mem_total", 0)),
            "memCache": int(data.get("mem_cache", 0)), "diskUsed": int(data.get("disk_used", 0)),
            "diskTotal": int(data.get("disk_total", 0))}  # fmt: skip


def log_lines(lines: list[tuple[float, str]]) -> Row:
    return {"logs": [{"timestamp": rfc3339(ts), "line": line} for ts, line in lines],
            "logEntries": [{"timestamp": rfc3339(ts), "message": line, "level": "info",
                            "fields": {}} for ts, line in lines]}  # fmt: skip


def team_key(row: Row) -> Row:
    return {"id": row["id"], "name": row["name"], "mask": {"prefix": row["prefix"]},
            "createdAt": rfc3339(row["created_at"]),
            "lastUsed": rfc3339(row["last_used_at"]) if row["last_used_at"] else None}  # fmt: skip


def volume(row: Row, token: str | None = None) -> Row:
    """`Volume`, or `VolumeAndToken` with its token."""
    body = {"volumeID": row["id"], "name": row["name"]}
    return body if token is None else {**body, "token": token}


def node(row: Row) -> Row:
    return {
        "nodeID": row["id"], "address": row["address"], "proxyAddress": row["proxy_address"],
        "status": nodes.status(row),
        "state": row["state"], "labels": row["labels"], "cpuCount": row["cpu_count"],
        "memoryMB": row["memory_mb"], "maxSandboxes": row["max_sandboxes"],
        "runscVersion": row["runsc_version"], "platform": row["platform"],
        "sandboxes": row["sandboxes"], "allocatedCPUs": row["allocated_cpus"],
        "allocatedMemoryMB": row["allocated_memory_mb"],
        "startedAt": rfc3339(row["started_at"]), "heartbeatAt": rfc3339(row["heartbeat_at"]),
    }  # fmt: skip
