"""Settings, read once from `VIVARIUM_*` environment variables.

Every host-local path derives from one state directory, so a second instance (tests, a
staging node) only needs its own `VIVARIUM_STATE_DIR`, slot prefix and slot range.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from vivarium.errors import ConfigError


def _env(name: str, default: str) -> str:
    return os.environ.get(f"VIVARIUM_{name}", default)


def _env_int(name: str, default: int) -> int:
    raw = _env(name, str(default))
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"VIVARIUM_{name}={raw!r} is not a whole number") from None


def _env_list(name: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in _env(name, "").split(",") if part.strip())


def parse_sizes(name: str, raw: str) -> tuple[tuple[str, int], ...]:
    """`base=2,code-interpreter-v1=1` -> (("base", 2), ("code-interpreter-v1", 1))."""
    sizes = []
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip().isdigit():
            raise ConfigError(
                f"VIVARIUM_{name}={raw!r}: {part!r} is not TEMPLATE=COUNT",
                "for example base=2,code-interpreter-v1=1; empty for none",
            )
        sizes.append((key.strip(), int(value)))
    return tuple(sizes)


def parse_labels(raw: str) -> tuple[tuple[str, str], ...]:
    """VIVARIUM_NODE_LABELS `zone=a,disk=ssd` -> (("zone", "a"), ("disk", "ssd"))."""
    labels = []
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"VIVARIUM_NODE_LABELS={raw!r}: {part!r} is not KEY=VALUE",
                              "for example zone=a,disk=ssd; empty for none")  # fmt: skip
        labels.append((key.strip(), value.strip()))
    return tuple(labels)


def parse_s3_url(url: str) -> tuple[str, str]:
    """VIVARIUM_SNAPSHOT_URL `s3://bucket/some/prefix` -> ("bucket", "some/prefix")."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc or parsed.query or parsed.fragment:
        raise ConfigError(
            f"VIVARIUM_SNAPSHOT_URL={url!r} is not of the form s3://bucket[/prefix]",
            "leave it empty to keep snapshots on the local disk only",
        )
    return parsed.netloc, parsed.path.strip("/")


DEFAULT_WARM_POOL = (("base", 2), ("code-interpreter-v1", 1))
# What `vivarium serve` runs (docs/operations.md, *Several hosts*): everything in one process
# (the default), or one part of a cluster over PostgreSQL: the public API (placement and
# routing), a node agent (its sandboxes, their lifecycle and its own sandbox proxy), or the
# public sandbox proxy.
ROLES = ("all", "api", "node", "proxy")
MIN_SECRET_CHARS = 32


@dataclass(frozen=True)
class Settings:
    state_dir: Path = Path("/var/lib/vivarium")
    # Templates are large and slow to build; instances may share one template directory.
    template_dir: Path | None = None
    api_host: str = "127.0.0.1"
    api_port: int = 3000
    # Sandbox traffic (E2B_SANDBOX_URL): one listener, routed by headers or by Host under domain.
    proxy_host: str = "127.0.0.1"
    proxy_port: int = 3001
    # What sandboxes' `domain` is (clients build `<port>-<id>.<domain>` of it, get_host): a
    # wildcard DNS name of the proxy, with its port if not 443. Empty: `localhost:<proxy_port>`,
    # which works on this machine with no DNS set up (curl, browsers and, through
    # libnss-myhostname, every program resolve `*.localhost` to loopback).
    proxy_domain: str = ""
    # TLS on the API and the proxy (tls.py): a PEM certificate (chain) and its key; empty: HTTP.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # SQL state of the control plane; empty: a SQLite file in the state directory.
    database_url: str = ""
    # Sandboxes one team may run at once (E2B's per-team concurrency limit).
    team_max_sandboxes: int = 20
    # Who may read GET /metrics on the API (telemetry.py): "off", "local" (clients on this host
    # only) or "token" (Authorization: Bearer <metrics_token>, from anywhere).
    metrics: str = "local"
    metrics_token: str = ""
    # Lifecycle events are also posted there, signed with the secret (api/events.py).
    webhook_url: str = ""
    webhook_secret: str = ""
    # How long a killed sandbox's metrics history is kept (node/metrics_history.py).
    metrics_retention_s: int = 3600
    # Volumes (node/volumes.py): how many a team may have, and each one's size (a sparse image:
    # only what is written costs disk).
    team_max_volumes: int = 100
    volume_size_mb: int = 10240
    # Paused sandboxes whose snapshot is older are deleted (0: kept until killed).
    snapshot_max_age_s: int = 30 * 24 * 3600
    # Durable copy of every snapshot: s3://bucket[/prefix] (empty: snapshots on local disk only).
    # Credentials come from boto3's chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws, ...).
    snapshot_url: str = ""
    s3_endpoint_url: str = ""  # an S3-compatible server (MinIO, Ceph ...); empty: AWS
    # Paused sandboxes' snapshots as deduplicated chunks (node/chunks.py), here and in S3;
    # off (VIVARIUM_SNAPSHOT_DEDUP=0): whole runsc-compressed images.
    snapshot_dedup: bool = True
    # Network slots: names are prefixed so several instances can share a host.
    slot_prefix: str = "viv"
    slot_cidr: str = "10.231.0.0/18"
    slot_prewarm: int = 4
    max_sandboxes: int = 128
    max_starting: int = 4  # sandboxes restoring at once; more wait (2 cores: more only thrash)
    # Timer slack of idle sandboxes' host threads (node/idle_timers.py): an idle sandbox costs
    # 4–8 ms of CPU a second instead of ~50; 0 keeps every sandbox's timers precise.
    idle_timer_slack_ms: int = 20
    # Sandboxes kept restored per template for instant creates (node/warm.py).
    warm_pool: tuple[tuple[str, int], ...] = DEFAULT_WARM_POOL
    # This host's node in the registry (api/nodes.py): its id and labels, shown by
    # `vivarium node list`.
    node_id: str = "local"
    node_labels: tuple[tuple[str, str], ...] = ()
    role: str = "all"
    # The parts of a cluster prove themselves to each other with it (a node's API answers only
    # requests that carry it); it also seeds the sandboxes' envd tokens, which every node must
    # derive alike. Required by every role but `all`.
    cluster_secret: str = ""
    # Where the API replicas and the proxy reach this node's API and sandbox proxy (its
    # cluster address); empty: its API and proxy host and port.
    node_url: str = ""
    node_proxy_url: str = ""
    # The CA that signed the nodes' certificates (nodes with VIVARIUM_TLS_CERT are reached over
    # TLS): the API replicas and the proxy verify them with it; empty: the host's store.
    cluster_ca_file: Path | None = None
    # How often a cluster's node compares what it holds with the catalog (what the cluster gave
    # up, copies of templates and volumes that went elsewhere), stores changed volumes and
    # applies retention to lost nodes' paused sandboxes.
    cluster_sweep_s: float = 30.0
    # Destinations a sandbox with internet access may reach even though they are private
    # or host addresses (an internal package mirror, say). Empty by default.
    egress_allow: tuple[str, ...] = field(default_factory=tuple)
    # The DNS servers the egress proxy resolves allowed hostnames with, and sandboxes' DNS is
    # forwarded to unless their rules name others; empty: the host's own (/etc/resolv.conf).
    egress_dns: tuple[str, ...] = field(default_factory=tuple)
    # CA certificates (PEM) the egress proxy trusts, beside the host's, when it connects on to
    # hosts whose requests it adds headers to (an internal CA, say).
    egress_ca_file: Path | None = None
    # Where `from_image` names without a registry are pulled from (Docker Hub by default), and
    # registries reached over plain HTTP (host[:port], e.g. one on the operator's network).
    registry_mirror: str = ""
    # A template build's step (RUN, COPY) that runs longer is stopped and fails the build.
    build_step_timeout_s: int = 3600
    build_disk_mb: int = 10240  # what one step of a template build may write
    # The CA bundle a build's steps trust (the host's store: a TLS-intercepting proxy's CA in
    # it reaches apt, pip, npm and curl in the build).
    build_ca_file: Path | None = Path("/etc/ssl/certs/ca-certificates.crt")
    registry_insecure: tuple[str, ...] = field(default_factory=tuple)
    default_timeout_s: int = 300
    max_timeout_s: int = 24 * 3600
    default_memory_mb: int = 1024
    default_cpus: float = 1.0
    default_pids: int = 512
    # The writable layer of a sandbox (a template may set its own): past it, writes get ENOSPC.
    default_disk_mb: int = 10240
    runsc_path: str = "runsc"
    runsc_platform: str = ""  # empty: probe
    # The dashboard's built files (Vite's dist/); None: dashboard/dist of this source tree.
    dashboard_dir: Path | None = None

    @property
    def sandbox_domain(self) -> str:
        return self.proxy_domain or f"localhost:{self.proxy_port}"

    @classmethod
    def from_env(cls) -> Settings:
        settings = cls(
            state_dir=Path(_env("STATE_DIR", "/var/lib/vivarium")),
            template_dir=Path(t) if (t := _env("TEMPLATE_DIR", "")) else None,
            api_host=_env("API_HOST", "127.0.0.1"),
            api_port=_env_int("API_PORT", 3000),
            proxy_host=_env("PROXY_HOST", "127.0.0.1"),
            proxy_port=_env_int("PROXY_PORT", 3001),
            proxy_domain=_env("PROXY_DOMAIN", ""),
            tls_cert=Path(c) if (c := _env("TLS_CERT", "")) else None,
            tls_key=Path(k) if (k := _env("TLS_KEY", "")) else None,
            database_url=_env("DATABASE_URL", ""),
            team_max_sandboxes=_env_int("TEAM_MAX_SANDBOXES", 20),
            metrics=_env("METRICS", "local"),
            metrics_token=_env("METRICS_TOKEN", ""),
            metrics_retention_s=_env_int("METRICS_RETENTION", 3600),
            webhook_url=_env("WEBHOOK_URL", ""),
            webhook_secret=_env("WEBHOOK_SECRET", ""),
            team_max_volumes=_env_int("TEAM_MAX_VOLUMES", 100),
            volume_size_mb=_env_int("VOLUME_SIZE_MB", 10240),
            snapshot_max_age_s=_env_int("SNAPSHOT_MAX_AGE", 30 * 24 * 3600),
            snapshot_url=_env("SNAPSHOT_URL", ""),
            s3_endpoint_url=_env("S3_ENDPOINT_URL", ""),
            snapshot_dedup=_env("SNAPSHOT_DEDUP", "1") == "1",
            slot_prefix=_env("SLOT_PREFIX", "viv"),
            slot_cidr=_env("SLOT_CIDR", "10.231.0.0/18"),
            slot_prewarm=_env_int("SLOT_PREWARM", 4),
            max_sandboxes=_env_int("MAX_SANDBOXES", 128),
            max_starting=_env_int("MAX_STARTING", 4),
            idle_timer_slack_ms=_env_int("IDLE_TIMER_SLACK_MS", 20),
            warm_pool=parse_sizes("WARM_POOL", _env("WARM_POOL", "base=2,code-interpreter-v1=1")),
            node_id=_env("NODE_ID", "local"),
            node_labels=parse_labels(_env("NODE_LABELS", "")),
            role=_env("ROLE", "all"),
            cluster_secret=_env("CLUSTER_SECRET", ""),
            node_url=_env("NODE_URL", ""),
            node_proxy_url=_env("NODE_PROXY_URL", ""),
            cluster_ca_file=Path(f) if (f := _env("CLUSTER_CA_FILE", "")) else None,
            cluster_sweep_s=float(max(1, _env_int("CLUSTER_SWEEP_S", 30))),
            egress_allow=_env_list("EGRESS_ALLOW"),
            egress_dns=_env_list("EGRESS_DNS"),
            egress_ca_file=Path(f) if (f := _env("EGRESS_CA_FILE", "")) else None,
            registry_mirror=_env("REGISTRY_MIRROR", ""),
            build_step_timeout_s=_env_int("BUILD_STEP_TIMEOUT", 3600),
            build_disk_mb=_env_int("BUILD_DISK_MB", 10240),
            build_ca_file=Path(_env("BUILD_CA_FILE", "/etc/ssl/certs/ca-certificates.crt")),
            registry_insecure=_env_list("REGISTRY_INSECURE"),
            default_timeout_s=_env_int("DEFAULT_TIMEOUT", 300),
            max_timeout_s=_env_int("MAX_TIMEOUT", 24 * 3600),
            default_memory_mb=_env_int("DEFAULT_MEMORY_MB", 1024),
            default_pids=_env_int("DEFAULT_PIDS", 512),
            default_disk_mb=_env_int("DEFAULT_DISK_MB", 10240),
            runsc_path=_env("RUNSC", "runsc"),
            runsc_platform=_env("RUNSC_PLATFORM", ""),
            dashboard_dir=Path(d) if (d := _env("DASHBOARD_DIR", "")) else None,
        )
        settings.validate()
        return settings

    def validate(self) -> None:
        if not (1 <= len(self.slot_prefix) <= 4 and self.slot_prefix.isalnum()):
            # Interface names are limited to 15 bytes: prefix + "h-" + slot number.
            raise ConfigError("VIVARIUM_SLOT_PREFIX must be 1-4 letters or digits")
        try:
            net = ipaddress.ip_network(self.slot_cidr)
        except ValueError as exc:
            raise ConfigError(f"VIVARIUM_SLOT_CIDR: {exc}") from None
        if net.version != 4 or net.prefixlen > 28:
            raise ConfigError("VIVARIUM_SLOT_CIDR must be an IPv4 range of /28 or larger")
        for cidr in self.egress_allow:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise ConfigError(f"VIVARIUM_EGRESS_ALLOW: {exc}") from None
        for server in self.egress_dns:
            try:
                ipaddress.ip_address(server)
            except ValueError as exc:
                raise ConfigError(f"VIVARIUM_EGRESS_DNS: {exc}") from None
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("VIVARIUM_TLS_CERT and VIVARIUM_TLS_KEY go together",
                              "set both for HTTPS, or neither for plain HTTP")  # fmt: skip
        if self.team_max_sandboxes < 1:
            raise ConfigError("VIVARIUM_TEAM_MAX_SANDBOXES must be at least 1")
        if self.max_starting < 1:
            raise ConfigError("VIVARIUM_MAX_STARTING must be at least 1")
        if self.metrics not in ("off", "local", "token"):
            raise ConfigError("VIVARIUM_METRICS must be off, local or token")
        if self.metrics == "token" and len(self.metrics_token) < 16:
            raise ConfigError("VIVARIUM_METRICS=token needs VIVARIUM_METRICS_TOKEN",
                              "set it to a secret of 16 characters or more")  # fmt: skip
        hook = urlparse(self.webhook_url)
        if self.webhook_url and (hook.scheme not in ("http", "https") or not hook.netloc):
            raise ConfigError(f"VIVARIUM_WEBHOOK_URL={self.webhook_url!r} is not an http(s) URL")
        if self.webhook_url and len(self.webhook_secret) < 16:
            raise ConfigError("VIVARIUM_WEBHOOK_URL needs VIVARIUM_WEBHOOK_SECRET",
                              "set it to a secret of 16 characters or more: receivers check "
                              "the signature with it")  # fmt: skip
        if self.team_max_volumes < 0:
            raise ConfigError("VIVARIUM_TEAM_MAX_VOLUMES must be 0 or more")
        if not 16 <= self.volume_size_mb <= 4 << 20:
            raise ConfigError("VIVARIUM_VOLUME_SIZE_MB must be 16..4194304 (4 TiB)")
        if self.max_sandboxes < 1:
            raise ConfigError("VIVARIUM_MAX_SANDBOXES must be at least 1")
        if not 0 <= self.idle_timer_slack_ms <= 1000:
            raise ConfigError("VIVARIUM_IDLE_TIMER_SLACK_MS must be 0..1000",
                              "0 keeps idle sandboxes' timers precise")  # fmt: skip
        if self.snapshot_url:
            parse_s3_url(self.snapshot_url)
        self._validate_cluster()
        endpoint = urlparse(self.s3_endpoint_url)
        if self.s3_endpoint_url and (
            endpoint.scheme not in ("http", "https") or not endpoint.netloc
        ):
            raise ConfigError(f"VIVARIUM_S3_ENDPOINT_URL={self.s3_endpoint_url!r} is not an "
                              "http(s):// URL")  # fmt: skip

    def _validate_cluster(self) -> None:
        if self.role not in ROLES:
            raise ConfigError(f"VIVARIUM_ROLE={self.role!r} is not one of {', '.join(ROLES)}")
        if not (1 <= len(self.node_id) <= 64 and self.node_id.replace("-", "").isalnum()):
            raise ConfigError(f"VIVARIUM_NODE_ID={self.node_id!r}: use 1-64 letters, digits "
                              "and dashes", "for example the host's name")  # fmt: skip
        if self.role == "all":
            return
        if not self.database_url.startswith("postgresql"):
            raise ConfigError(
                f"VIVARIUM_ROLE={self.role} needs a shared catalog",
                "set VIVARIUM_DATABASE_URL=postgresql://... on every part",
            )
        if self.role == "proxy":  # it needs no secret, so the public host does not hold it
            return
        if len(self.cluster_secret) < MIN_SECRET_CHARS:
            raise ConfigError(
                f"VIVARIUM_ROLE={self.role} needs VIVARIUM_CLUSTER_SECRET",
                f"the same secret of {MIN_SECRET_CHARS} characters or more on the API "
                "replicas and the nodes: `openssl rand -hex 32`",
            )
        if self.role == "node":
            self._validate_node()
        for name, url in (("NODE_URL", self.node_url), ("NODE_PROXY_URL", self.node_proxy_url)):
            parsed = urlparse(url)
            if url and (parsed.scheme not in ("http", "https") or not parsed.port):
                raise ConfigError(f"VIVARIUM_{name}={url!r} is not an http(s)://host:port URL")

    def _validate_node(self) -> None:
        if self.node_id == "local":
            raise ConfigError("VIVARIUM_ROLE=node needs VIVARIUM_NODE_ID",
                              "a name of its own for each node: the host's, say")  # fmt: skip
        for name, url in (("NODE_URL", self.node_url), ("NODE_PROXY_URL", self.node_proxy_url)):
            host = urlparse(url).hostname or ""
            if not url or host in ("0.0.0.0", "::", "localhost") or host.startswith("127."):
                raise ConfigError(f"VIVARIUM_ROLE=node needs VIVARIUM_{name}",
                                  "the node's address on the cluster network, as the API "
                                  "replicas and the proxy reach it: http://10.0.0.11:"
                                  + ("3000" if name == "NODE_URL" else "3001"))  # fmt: skip
        if not self.snapshot_url:
            raise ConfigError(
                "VIVARIUM_ROLE=node needs a shared snapshot store",
                "set VIVARIUM_SNAPSHOT_URL=s3://bucket/prefix (the same on every node): a "
                "sandbox paused on one node resumes on another from it",
            )

    def node_snapshot_url(self, node_id: str) -> str:
        """Where a node keeps its snapshots in the shared store: in a cluster, each node its
        own part (its chunk collection then never meets another node's pauses); others read
        it to resume a sandbox paused there."""
        if not self.snapshot_url or self.role == "all":
            return self.snapshot_url
        return f"{self.snapshot_url.rstrip('/')}/nodes/{node_id}"

    @property
    def template_share_url(self) -> str:
        """Where a cluster's nodes share template builds (node/template_share.py); empty on
        one host, where they never leave it."""
        return self._shared("templates")

    @property
    def volume_share_url(self) -> str:
        """Where a cluster's volumes go between nodes (node/volume_share.py); empty on one
        host."""
        return self._shared("volumes")

    def _shared(self, part: str) -> str:
        if not self.snapshot_url or self.role == "all":
            return ""
        return f"{self.snapshot_url.rstrip('/')}/{part}"

    def cluster_client_tls(self) -> ssl.SSLContext:
        """How the API replicas and the proxy verify nodes that serve TLS."""
        context = ssl.create_default_context()
        if self.cluster_ca_file is not None:
            try:
                context.load_verify_locations(self.cluster_ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"VIVARIUM_CLUSTER_CA_FILE={self.cluster_ca_file}: {exc}",
                                  "a PEM file of the CA that signed the nodes' certificates"
                                  ) from None  # fmt: skip
        return context

    @property
    def advertised_node_url(self) -> str:
        """Where the rest of the cluster reaches this node's API."""
        return self.node_url or f"{self.scheme}://{self.api_host}:{self.api_port}"

    @property
    def advertised_proxy_url(self) -> str:
        """Where the cluster's proxy reaches this node's sandbox proxy."""
        return self.node_proxy_url or f"{self.scheme}://{self.proxy_host}:{self.proxy_port}"

    @property
    def scheme(self) -> str:
        """Of the API and the proxy."""
        return "https" if self.tls_cert else "http"

    @property
    def templates_root(self) -> Path:
        return self.template_dir or self.state_dir / "templates"

    @property
    def sandboxes_dir(self) -> Path:
        return self.state_dir / "sandboxes"

    @property
    def runsc_root(self) -> Path:
        return self.state_dir / "runsc"

    @property
    def volumes_dir(self) -> Path:
        return self.state_dir / "volumes"

    @property
    def node_socket(self) -> Path:
        return self.state_dir / "node.sock"

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.state_dir / 'vivarium.db'}"

    @property
    def secret_file(self) -> Path:
        """Seed for per-sandbox envd tokens (HMAC); several API hosts must share it."""
        return self.state_dir / "secret.key"

    @property
    def admin_key_file(self) -> Path:
        """The first API key, kept for the local CLI (root-only)."""
        return self.state_dir / "admin.key"

    @property
    def cache_dir(self) -> Path:
        return self.state_dir / "cache"
