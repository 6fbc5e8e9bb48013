"""Tables. Times are Unix seconds (floats): the same on SQLite and PostgreSQL, no time zones."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

teams = Table(
    "teams",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("max_sandboxes", Integer, nullable=False),
    # May create teams; the team `vivarium serve` makes on first start.
    Column("is_admin", Boolean, nullable=False, default=False),
    Column("created_at", Float, nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("team_id", String(36), ForeignKey("teams.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(200), nullable=False),
    Column("prefix", String(16), nullable=False),  # shown in listings, identifies a key
    Column("key_hash", String(64), nullable=False, unique=True),  # sha256 hex, never the key
    Column("created_at", Float, nullable=False),
    Column("last_used_at", Float, nullable=True),
    Index("ix_api_keys_team_id", "team_id"),
)

sandboxes = Table(
    "sandboxes",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("team_id", String(36), ForeignKey("teams.id", ondelete="CASCADE"), nullable=False),
    Column("template_id", String(200), nullable=False),
    Column("build_id", String(64), nullable=False, default=""),
    Column("node_id", String(64), nullable=False),
    # starting -> running -> (paused ->) killed; killed rows are kept for a while for logs.
    Column("state", String(16), nullable=False),
    Column("metadata", JSON, nullable=False),
    Column("cpu_count", Integer, nullable=False),
    Column("memory_mb", Integer, nullable=False),
    Column("disk_mb", Integer, nullable=False),
    Column("auto_pause", Boolean, nullable=False, default=False),
    # Traffic through the proxy to it while paused resumes it (E2B's lifecycle.auto_resume).
    Column("auto_resume", Boolean, nullable=False, default=False),
    Column("allow_internet", Boolean, nullable=False, default=True),
    # Its egress rules (network/egress.py Egress.to_json()); null: open, or `allow_internet`.
    Column("egress", JSON, nullable=True),
    Column("secure", Boolean, nullable=False, default=True),
    # False: its ports (but envd's) answer only requests with its traffic token.
    Column("public_traffic", Boolean, nullable=False, default=True),
    Column("envd_version", String(32), nullable=False),
    Column("started_at", Float, nullable=False),
    Column("end_at", Float, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("ended_at", Float, nullable=True),
    Column("end_reason", Text, nullable=True),
    # [{"name", "path", "volume_id"}]: the team's volumes it mounts (kept for its snapshots).
    Column("volume_mounts", JSON, nullable=False, default=list),
    # The Idempotency-Key of its create: a create with the same key gets this sandbox.
    Column("idempotency_key", String(255), nullable=True),
    Index("ix_sandboxes_team_state", "team_id", "state"),
    Index("ix_sandboxes_team_key", "team_id", "idempotency_key"),
)

# The latest snapshot of each paused sandbox (its node keeps the files).
snapshots = Table(
    "snapshots",
    metadata,
    Column(
        "sandbox_id", String(64), ForeignKey("sandboxes.id", ondelete="CASCADE"), primary_key=True
    ),  # fmt: skip
    Column("team_id", String(36), ForeignKey("teams.id", ondelete="CASCADE"), nullable=False),
    Column("template_id", String(200), nullable=False),
    Column("node_id", String(64), nullable=False),
    Column("metadata", JSON, nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    Column("checksum", String(64), nullable=False),
    Column("runsc_version", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
)

# A team's snapshots of running sandboxes (create_snapshot): started from by creates that name
# them, kept until deleted (their node keeps the files, under the snapshot's id).
team_snapshots = Table(
    "team_snapshots",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("team_id", String(36), ForeignKey("teams.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(200), nullable=True),  # a create may name it instead of the id
    # Its files on the node: each snapshot taken under the name is a new build (the old one is
    # deleted once no create reads it).
    Column("build_key", String(64), nullable=False),
    Column("sandbox_id", String(64), nullable=False),  # the source, which may have ended since
    Column("template_id", String(200), nullable=False),
    Column("node_id", String(64), nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("volume_mounts", JSON, nullable=False, default=list),  # the source's
    UniqueConstraint("team_id", "name", name="uq_team_snapshots_team_name"),
)

# A team's volumes (node/volumes.py): the node that holds the files, and the name sandboxes
# mount them by.
volumes = Table(
    "volumes",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("team_id", String(36), ForeignKey("teams.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(63), nullable=False),
    Column("node_id", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    UniqueConstraint("team_id", "name", name="uq_volumes_team_name"),
)

# What happened to each sandbox, and who or what made it happen (api/events.py).
sandbox_events = Table(
    "sandbox_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("team_id", String(36), ForeignKey("teams.id", ondelete="CASCADE"), nullable=False),
    Column("sandbox_id", String(64), nullable=False),
    Column("type", String(32), nullable=False),
    Column("actor", String(200), nullable=False),  # "key:<name>", "timeout", "traffic", "node"
    Column("reason", Text, nullable=True),
    Column("at", Float, nullable=False),
    Index("ix_sandbox_events_team_at", "team_id", "at"),
    Index("ix_sandbox_events_sandbox_at", "sandbox_id", "at"),
)

# Templates a team built with the SDK (node/template_builds.py): named per team, each build a
# directory on its node; `build_id` is the build that creates use (the latest ready one).
team_templates = Table(
    "team_templates",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("team_id", String(36), ForeignKey("teams.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(200), nullable=False),
    Column("build_id", String(64), nullable=True),
    Column("node_id", String(64), nullable=False),
    Column("cpu_count", Integer, nullable=False),
    Column("memory_mb", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    UniqueConstraint("team_id", "name", name="uq_team_templates_team_name"),
)

template_builds = Table(
    "template_builds",
    metadata,
    Column("id", String(64), primary_key=True),
    Column(
        "template_id",
        String(64),
        ForeignKey("team_templates.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("status", String(16), nullable=False),  # waiting | building | ready | error
    Column("reason", Text, nullable=True),
    Column("step", String(32), nullable=True),  # the failed step, as the client names steps
    Column("tags", JSON, nullable=False, default=list),  # given to the build once it is ready
    Column("created_at", Float, nullable=False),
    Column("finished_at", Float, nullable=True),
)

template_tags = Table(
    "template_tags",
    metadata,
    Column(
        "template_id",
        String(64),
        ForeignKey("team_templates.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("tag", String(128), primary_key=True),
    Column("build_id", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
)

# The node agents: each registers at start and heartbeats (api/nodes.py). `state` is the
# operator's choice (ready or draining); a node whose heartbeat stopped shows as unhealthy.
nodes = Table(
    "nodes",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("address", String(255), nullable=False),  # where the control plane reaches it
    Column("proxy_address", String(255), nullable=False, default=""),  # its sandbox proxy
    # An HMAC of a fixed text under its cluster secret: nodes with another secret are refused.
    Column("secret_check", String(64), nullable=False, default=""),
    Column("state", String(16), nullable=False),
    Column("labels", JSON, nullable=False, default=dict),
    Column("cpu_count", Integer, nullable=False),
    Column("memory_mb", Integer, nullable=False),
    Column("max_sandboxes", Integer, nullable=False),
    Column("runsc_version", String(64), nullable=False),
    Column("platform", String(16), nullable=False),
    Column("sandboxes", Integer, nullable=False, default=0),  # running, as of the heartbeat
    Column("allocated_cpus", Float, nullable=False, default=0.0),
    Column("allocated_memory_mb", Integer, nullable=False, default=0),
    Column("started_at", Float, nullable=False),
    Column("heartbeat_at", Float, nullable=False),
)
