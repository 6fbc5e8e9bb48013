"""The OpenAPI 3.0 document served at `/openapi.json`: the E2B subset this server implements.

Field names follow E2B's published spec; the fuzz test (tests/compat/test_fuzz_api.py) drives
the API from this document, so it must stay true to the routes in app.py.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

STR_MAP: Schema = {"type": "object", "additionalProperties": {"type": "string"}}
ERROR: Schema = {
    "type": "object",
    "required": ["code", "message"],
    "properties": {"code": {"type": "integer"}, "message": {"type": "string"},
                   "error_code": {"type": "string"}},
}  # fmt: skip
STR_LIST: Schema = {"type": "array", "items": {"type": "string"}}
EGRESS_PROXY: Schema = {
    "type": "object",
    "required": ["address"],
    "properties": {
        "address": {"type": "string"}, "username": {"type": "string"},
        "password": {"type": "string"},
        "tls": {"type": "object", "properties": {"enabled": {"type": "boolean"},
                                                 "serverName": {"type": "string"},
                                                 "caCert": {"type": "string"}}},
    },
}  # fmt: skip
EGRESS: Schema = {
    "type": "object",
    "properties": {"allowOut": STR_LIST, "denyOut": STR_LIST, "dnsServers": STR_LIST,
                   "egressProxy": EGRESS_PROXY},
}  # fmt: skip
NEW_SANDBOX: Schema = {
    "type": "object",
    "required": ["templateID"],
    "properties": {
        "templateID": {"type": "string"},
        "timeout": {"type": "integer"},
        "autoPause": {"type": "boolean"},
        "autoResume": {"type": "object", "properties": {"enabled": {"type": "boolean"}}},
        "allow_internet_access": {"type": "boolean"},
        "secure": {"type": "boolean"},
        "network": {
            **EGRESS,
            "properties": {**EGRESS["properties"], "allowPublicTraffic": {"type": "boolean"}},
        },
        "metadata": STR_MAP,
        "envVars": STR_MAP,
    },
}
SANDBOX: Schema = {
    "type": "object",
    "required": ["templateID", "sandboxID", "clientID", "envdVersion"],
    "properties": {
        "templateID": {"type": "string"}, "sandboxID": {"type": "string"},
        "clientID": {"type": "string"}, "envdVersion": {"type": "string"},
        "alias": {"type": "string"}, "envdAccessToken": {"type": "string", "nullable": True},
        "trafficAccessToken": {"type": "string", "nullable": True},
        "domain": {"type": "string", "nullable": True},
    },
}  # fmt: skip
LISTED: Schema = {
    "type": "object",
    "required": ["templateID", "sandboxID", "clientID", "startedAt", "endAt", "cpuCount",
                 "memoryMB", "diskSizeMB", "state", "envdVersion"],
    "properties": {
        "templateID": {"type": "string"}, "sandboxID": {"type": "string"},
        "clientID": {"type": "string"}, "startedAt": {"type": "string", "format": "date-time"},
        "endAt": {"type": "string", "format": "date-time"}, "cpuCount": {"type": "integer"},
        "memoryMB": {"type": "integer"}, "diskSizeMB": {"type": "integer"},
        "state": {"type": "string", "enum": ["running", "paused"]},
        "envdVersion": {"type": "string"}, "metadata": STR_MAP, "alias": {"type": "string"},
    },
}  # fmt: skip
SNAPSHOT_INFO: Schema = {
    "type": "object",
    "required": ["snapshotID", "names"],
    "properties": {"snapshotID": {"type": "string"},
                   "names": {"type": "array", "items": {"type": "string"}}},
}  # fmt: skip
VOLUME: Schema = {
    "type": "object",
    "required": ["volumeID", "name"],
    "properties": {"volumeID": {"type": "string"}, "name": {"type": "string"},
                   "token": {"type": "string"}},
}  # fmt: skip
VOLUME_ENTRY: Schema = {
    "type": "object",
    "required": ["name", "type", "path", "size", "mode", "uid", "gid", "atime", "mtime", "ctime"],
    "properties": {
        "name": {"type": "string"}, "path": {"type": "string"}, "target": {"type": "string"},
        "type": {"type": "string", "enum": ["file", "directory", "symlink", "unknown"]},
        **{k: {"type": "integer"} for k in ("size", "mode", "uid", "gid")},
        **{k: {"type": "string", "format": "date-time"} for k in ("atime", "mtime", "ctime")},
    },
}  # fmt: skip
EVENT: Schema = {
    "type": "object",
    "required": ["id", "sandboxID", "type", "actor", "timestamp"],
    "properties": {
        "id": {"type": "integer"}, "sandboxID": {"type": "string"},
        "type": {"type": "string"}, "actor": {"type": "string"},
        "reason": {"type": "string", "nullable": True},
        "timestamp": {"type": "string", "format": "date-time"},
    },
}  # fmt: skip
ID = {"name": "sandbox_id", "in": "path", "required": True, "schema": {"type": "string"}}
VOLUME_ID = {"name": "volume_id", "in": "path", "required": True, "schema": {"type": "string"}}
NODE_ID = {"name": "node_id", "in": "path", "required": True, "schema": {"type": "string"}}
NODE: Schema = {"type": "object", "properties": {
    "nodeID": {"type": "string"}, "address": {"type": "string"},
    "status": {"type": "string", "enum": ["ready", "draining", "unhealthy"]},
    "state": {"type": "string", "enum": ["ready", "draining"]},
    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    "cpuCount": {"type": "integer"}, "memoryMB": {"type": "integer"},
    "maxSandboxes": {"type": "integer"}, "runscVersion": {"type": "string"},
    "platform": {"type": "string"}, "sandboxes": {"type": "integer"},
    "allocatedCPUs": {"type": "number"}, "allocatedMemoryMB": {"type": "integer"},
    "startedAt": {"type": "string", "format": "date-time"},
    "heartbeatAt": {"type": "string", "format": "date-time"},
}}  # fmt: skip
TIME_RANGE = [
    {"name": name, "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0}}
    for name in ("start", "end")
]


def _json(schema: Schema) -> Schema:
    return {"content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Schema]:
    return {str(c): {"description": "error", **_json(ERROR)} for c in (400, 401, *codes)}


def _op(
    summary: str, ok: dict[str, Schema], *, body: Schema | None = None,
    params: list[Schema] | None = None, errors: tuple[int, ...] = (404,),
) -> Schema:  # fmt: skip
    op: Schema = {"summary": summary, "responses": {**ok, **_errors(*errors)}}
    if body is not None:
        op["requestBody"] = {"required": False, **_json(body)}
    if params:
        op["parameters"] = params
    return op


def _no_content() -> dict[str, Schema]:
    return {"204": {"description": "done"}}


def _volume_content() -> Schema:
    """The volume content API: the volume's token as a bearer token, not an API key."""
    entry = {"description": "the entry", **_json(VOLUME_ENTRY)}

    def op(summary: str, ok: dict[str, Schema], query: tuple[str, ...] = (), **kw: Any) -> Schema:
        kinds = {"depth": "integer", "uid": "integer", "gid": "integer", "mode": "integer",
                 "force": "boolean"}  # fmt: skip
        params = [VOLUME_ID, {"name": "path", "in": "query", "required": True,
                              "schema": {"type": "string"}}]  # fmt: skip
        params += [{"name": q, "in": "query", "schema": {"type": kinds[q]}} for q in query]
        return {
            **_op(summary, ok, params=params, errors=(404, 507), **kw),
            "security": [{"VolumeToken": []}],
        }

    content = "/volumecontent/{volume_id}"
    owner = ("uid", "gid", "mode")
    return {
        content + "/path": {
            "get": op("stat an entry", {"200": entry}),
            "delete": op("remove a file or directory (recursively)", _no_content()),
            "patch": op("change owner or mode", {"200": entry},
                        body={"type": "object", "properties": {
                            k: {"type": "integer"} for k in owner}}),
        },
        content + "/dir": {
            "get": op("list a directory", {"200": {"description": "entries", **_json(
                {"type": "array", "items": VOLUME_ENTRY})}}, ("depth",)),
            "post": op("make a directory", {"201": entry}, (*owner, "force")),
        },
        content + "/file": {
            "get": op("read a file", {"200": {"description": "its bytes"}}),
            "put": op("write a file (atomically replaced)", {"201": entry}, (*owner, "force")),
        },
    }  # fmt: skip


def _template_builds() -> Schema:
    """A team's template builds, as the SDK's Template.build drives them."""
    tid = {"name": "template_id", "in": "path", "required": True, "schema": {"type": "string"}}
    bid = {"name": "build_id", "in": "path", "required": True, "schema": {"type": "string"}}
    files_hash = {"name": "hash", "in": "path", "required": True, "schema": {"type": "string"}}
    step = {
        "type": "object",
        "required": ["type"],
        "properties": {
            "type": {"type": "string"},
            "args": {"type": "array", "items": {"type": "string"}},
            "filesHash": {"type": "string"},
            "force": {"type": "boolean"},
        },
    }
    tags = {"type": "array", "items": {"type": "string"}}
    obj = {"type": "object"}
    return {
        "/v3/templates": {"post": _op(
            "request a build of a team template (new, or a new build of one)",
            {"202": {"description": "template and build ids", **_json(obj)}},
            body={"type": "object", "required": ["name"], "properties": {
                "name": {"type": "string"}, "tags": tags, "cpuCount": {"type": "integer"},
                "memoryMB": {"type": "integer"}}}, errors=(409, 429))},
        "/templates/{template_id}/files/{hash}": {
            "get": _op("whether a COPY step's files are stored, else where to upload them",
                       {"201": {"description": "present, or an upload url", **_json(obj)}},
                       params=[tid, files_hash]),
            "put": {**_op("upload a COPY step's files (a tar, gzip'd or not)",
                          {"201": {"description": "stored"}},
                          params=[tid, files_hash, {"name": "token", "in": "query",
                                                    "schema": {"type": "string"}}]),
                    "security": []},
        },
        "/v2/templates/{template_id}/builds/{build_id}": {"post": _op(
            "start the build", {"202": {"description": "started"}}, params=[tid, bid],
            body={"type": "object", "properties": {
                "fromImage": {"type": "string"}, "fromTemplate": {"type": "string"},
                "steps": {"type": "array", "items": step}, "startCmd": {"type": "string"},
                "readyCmd": {"type": "string"}, "force": {"type": "boolean"}}},
            errors=(404, 409, 429))},
        "/templates/{template_id}/builds/{build_id}/status": {"get": _op(
            "a build's status and log entries", {"200": {"description": "status",
                                                         **_json(obj)}},
            params=[tid, bid, *({"name": n, "in": "query", "schema": {"type": t}} for n, t in
                                (("logsOffset", "integer"), ("limit", "integer"),
                                 ("level", "string")))])},
        "/templates/aliases/{alias}": {"get": _op(
            "the team's template of that name", {"200": {"description": "its id",
                                                         **_json(obj)}},
            params=[{"name": "alias", "in": "path", "required": True,
                     "schema": {"type": "string"}}])},
        "/templates/tags": {
            "post": _op("tag a build (target name:tag)", {"201": {"description": "tagged",
                                                                  **_json(obj)}},
                        body={"type": "object", "required": ["target", "tags"], "properties": {
                            "target": {"type": "string"}, "tags": tags}}),
            "delete": _op("remove tags", _no_content(),
                          body={"type": "object", "required": ["name", "tags"], "properties": {
                              "name": {"type": "string"}, "tags": tags}}),
        },
        "/templates/{template_id}/tags": {"get": _op(
            "a template's tags", {"200": {"description": "tags", **_json(
                {"type": "array", "items": obj})}}, params=[tid])},
    }  # fmt: skip


def document() -> Schema:
    timeout_body = {"type": "object", "properties": {"timeout": {"type": "integer"}}}
    created = {"201": {"description": "created", **_json(SANDBOX)}}
    listing = {"200": {"description": "sandboxes", **_json({"type": "array", "items": LISTED})}}
    list_params = [
        {"name": "state", "in": "query", "schema": {"type": "string"}},
        {"name": "metadata", "in": "query", "schema": {"type": "string"}},
        {"name": "limit", "in": "query", "schema": {"type": "integer"}},
        {"name": "nextToken", "in": "query", "schema": {"type": "string"}},
        {"name": "order", "in": "query", "schema": {"type": "string", "enum": ["asc", "desc"]}},
    ]
    sandbox = "/sandboxes/{sandbox_id}"
    events = {"200": {"description": "events", **_json({"type": "array", "items": EVENT})}}
    event_params = [{"name": n, "in": "query", "schema": {"type": "integer", "minimum": 0}}
                    for n in ("after", "limit")]  # fmt: skip
    paths: Schema = {
        "/health": {"get": {"summary": "liveness", "security": [],
                            "responses": {"200": {"description": "ok"}}}},
        "/openapi.json": {"get": {"summary": "this document", "security": [],
                                  "responses": {"200": {"description": "OpenAPI 3"}}}},
        "/metrics": {"get": {"summary": "Prometheus metrics (VIVARIUM_METRICS: off, this host "
                                        "only, or a bearer token)", "security": [],
                             "responses": {"200": {"description": "text exposition format"},
                                           **_errors(403, 404)}}},
        "/sandboxes": {
            "post": _op("create (v1)", created, body=NEW_SANDBOX, errors=(404, 429)),
            "get": _op("list running (v1)", listing, params=list_params[1:2], errors=()),
        },
        "/v2/sandboxes": {
            "post": _op("create", created, body=NEW_SANDBOX, errors=(404, 429)),
            "get": _op("list", listing, params=list_params, errors=()),
        },
        sandbox: {
            "get": _op("details", {"200": {"description": "sandbox", **_json(LISTED)}},
                       params=[ID]),
            "delete": _op("kill", _no_content(), params=[ID]),
        },
        sandbox + "/timeout": {"post": _op("set timeout", _no_content(), body=timeout_body,
                                           params=[ID], errors=(404, 409))},
        sandbox + "/refreshes": {"post": _op(
            "extend timeout", _no_content(), params=[ID], errors=(404, 409),
            body={"type": "object", "properties": {"duration": {"type": "integer"}}})},
        sandbox + "/network": {"put": _op(
            "replace the egress rules", _no_content(), params=[ID], errors=(400, 404, 409),
            body={**EGRESS, "properties": {**EGRESS["properties"],
                                           "allow_internet_access": {"type": "boolean"}}})},
        sandbox + "/connect": {"post": _op("connect (v1)", {"200": created["201"], **created},
                                           body=timeout_body, params=[ID], errors=(404, 409))},
        "/v2" + sandbox + "/connect": {"post": _op(
            "connect", {"200": created["201"], **created}, body=timeout_body, params=[ID],
            errors=(404, 409))},
        sandbox + "/pause": {"post": _op("pause", _no_content(), params=[ID], errors=(404, 409),
                                         body={"type": "object"})},
        sandbox + "/resume": {"post": _op("resume (legacy)", created, body=timeout_body,
                                          params=[ID], errors=(404, 409, 429))},
        sandbox + "/metrics": {"get": _op("metrics", {"200": {"description": "samples"}},
                                          params=[ID, *TIME_RANGE], errors=(400, 404, 409))},
        sandbox + "/logs": {"get": _op("logs", {"200": {"description": "logs"}}, params=[ID],
                                       errors=(404, 409))},
        "/v2" + sandbox + "/logs": {"get": _op("logs (v2)", {"200": {"description": "logs"}},
                                               params=[ID], errors=(404, 409))},
        sandbox + "/events": {"get": _op(
            "the sandbox's lifecycle events, oldest first", events, params=[ID, *event_params])},
        "/events": {"get": _op("the team's lifecycle events, oldest first", events,
                               params=event_params, errors=())},
        sandbox + "/snapshots": {"post": _op(
            "snapshot (the sandbox keeps running)",
            {"201": {"description": "the snapshot", **_json(SNAPSHOT_INFO)}}, params=[ID],
            body={"type": "object", "properties": {"name": {"type": "string"},
                                                   "memory": {"type": "boolean"}}},
            errors=(404, 409, 422, 429))},
        sandbox + "/fork": {"post": _op(
            "fork: new sandboxes from one snapshot",
            {"201": {"description": "a sandbox or an error per child", **_json(
                {"type": "array", "items": {"type": "object", "properties": {
                    "sandbox": SANDBOX, "error": ERROR}}})}},
            params=[ID], errors=(404, 409, 422, 429),
            body={"type": "object", "properties": {"count": {"type": "integer"},
                                                   "timeout": {"type": "integer"}}})},
        "/snapshots": {"get": _op(
            "list snapshots", {"200": {"description": "snapshots", **_json(
                {"type": "array", "items": SNAPSHOT_INFO})}},
            params=[{"name": n, "in": "query", "schema": {"type": t}} for n, t in
                    (("sandboxID", "string"), ("name", "string"), ("limit", "integer"),
                     ("nextToken", "string"))], errors=())},
        "/sandboxes/metrics": {"get": _op(
            "the newest sample of each of the named running sandboxes",
            {"200": {"description": "{sandboxes: {id: SandboxMetric}}"}},
            params=[{"name": "sandbox_ids", "in": "query", "required": True,
                     "schema": {"type": "string"}, "description": "1..100, comma-separated"}],
            errors=(400,))},
        "/templates": {"get": _op("templates", {"200": {"description": "templates"}}, errors=())},
        **_template_builds(),
        "/templates/{template_id}": {"get": _op(
            "one of the team's templates, with its builds (newest first)",
            {"200": {"description": "TemplateWithBuilds"}},
            params=[{"name": "template_id", "in": "path", "required": True,
                     "schema": {"type": "string"}}]), "delete": _op(
            "delete one of the team's templates or snapshots", _no_content(),
            params=[{"name": "template_id", "in": "path", "required": True,
                     "schema": {"type": "string"}}])},
        "/api-keys": {
            "get": _op("list keys", {"200": {"description": "keys"}}, errors=()),
            "post": _op("create a key", {"201": {"description": "the key, shown once"}},
                        body={"type": "object", "required": ["name"],
                              "properties": {"name": {"type": "string"}}}, errors=()),
        },
        "/api-keys/{key_id}": {"delete": _op(
            "revoke one of the team's keys (not the one calling)", _no_content(),
            params=[{"name": "key_id", "in": "path", "required": True,
                     "schema": {"type": "string"}}], errors=(400, 404))},
        "/volumes": {
            "post": _op("create a volume", {"201": {"description": "the volume and its token",
                                                    **_json(VOLUME)}},
                        body={"type": "object", "required": ["name"],
                              "properties": {"name": {"type": "string"}}}, errors=(409, 429)),
            "get": _op("list volumes", {"200": {"description": "volumes", **_json(
                {"type": "array", "items": VOLUME})}}, errors=()),
        },
        "/volumes/{volume_id}": {
            "get": _op("a volume and its token", {"200": {"description": "volume",
                                                          **_json(VOLUME)}}, params=[VOLUME_ID]),
            "delete": _op("delete a volume (none may mount it)", _no_content(),
                          params=[VOLUME_ID], errors=(404, 409)),
        },
        **_volume_content(),
        "/teams": {"post": _op(
            "create a team (admin keys only; 404 to others)",
            {"201": {"description": "the team and its first key, shown once"}},
            body={"type": "object", "required": ["name"],
                  "properties": {"name": {"type": "string"}, "maxSandboxes": {"type": "integer"}}},
        )},
        "/nodes": {"get": _op("the node agents and their status (admin keys only; 404 to others)",
                              {"200": {"description": "nodes",
                                       **_json({"type": "array", "items": NODE})}})},
        "/nodes/{node_id}/drain": {"post": _op(
            "drain a node: no new sandboxes on it, the running ones stay (admin keys only)",
            {"200": {"description": "the node", **_json(NODE)}}, params=[NODE_ID])},
        "/nodes/{node_id}/undrain": {"post": _op(
            "make a drained node take new sandboxes again (admin keys only)",
            {"200": {"description": "the node", **_json(NODE)}}, params=[NODE_ID])},
    }  # fmt: skip
    return {
        "openapi": "3.0.3",
        "info": {"title": "vivarium (E2B-compatible API)", "version": "1"},
        "components": {"securitySchemes": {
            "ApiKeyAuth": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            "VolumeToken": {"type": "http", "scheme": "bearer"}}},
        "security": [{"ApiKeyAuth": []}],
        "paths": paths,
    }  # fmt: skip
