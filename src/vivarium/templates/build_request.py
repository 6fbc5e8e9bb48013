"""What a team asks a template build to do: the body of E2B's `POST /v2/templates/{id}/builds/
{buildID}`, as the SDK's Template builder sends it, checked before anything runs.

A build starts from a base (`fromTemplate`, or a `fromImage` we can provide) and applies the
steps in order (`RUN COPY ENV WORKDIR USER`); `startCmd` is then started and `readyCmd` polled
until it succeeds, and the sandbox is checkpointed with the program running.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vivarium.errors import InvalidArgument

STEP_TYPES = ("COPY", "ENV", "RUN", "WORKDIR", "USER")
MAX_STEPS = 400  # a layer each: overlayfs stacks 500 at most
MAX_ARG_BYTES = 64 << 10
MAX_READY_S = 3600
FILES_HASH_RE = re.compile(r"^[0-9a-f]{64}\Z")
# Build steps are named for the client by where its stack traces are: "base" for the `from_*`
# call, "1".."N" for the steps, "finalize" for the start and ready commands.
BASE_STEP = "base"
FINALIZE_STEP = "finalize"

# Images we provide without pulling: our Debian 12 templates. `from_debian_image()` asks for
# `debian:<variant>`, `Template()` for E2B's base image.
_IMAGES = {"e2bdev/base": "base", "e2bdev/code-interpreter": "code-interpreter-v1",
           "debian": "base"}  # fmt: skip
_DEBIAN_TAGS = {"", "latest", "stable", "bookworm", "12", "stable-slim", "bookworm-slim",
                "12-slim"}  # fmt: skip


def builtin_for_image(image: str) -> str | None:
    """The built-in template that stands for `image`, or None when it would have to be pulled."""
    name, _, tag = image.removeprefix("docker.io/").removeprefix("library/").partition(":")
    builtin = _IMAGES.get(name)
    if builtin is None or (name == "debian" and tag not in _DEBIAN_TAGS):
        return None
    return builtin


def code_version() -> str:
    """How we build, as a build's result depends on it: this package's code."""
    global _code_version
    if _code_version is None:
        h = hashlib.sha256()
        for source in sorted(Path(__file__).parent.glob("*.py")):
            h.update(source.read_bytes())
        _code_version = h.hexdigest()
    return _code_version


_code_version: str | None = None


@dataclass(frozen=True)
class Step:
    type: str
    args: tuple[str, ...]
    files_hash: str | None = None
    force: bool = False  # skip_cache(): run again, as every step after it

    @property
    def text(self) -> str:
        return f"{self.type} {' '.join(a for a in self.args if a)}"[:200]


@dataclass(frozen=True)
class BuildRequest:
    from_template: str | None
    from_image: str | None
    steps: tuple[Step, ...]
    start_cmd: str | None = None
    ready_cmd: str | None = None
    force: bool = False  # build it all again, whatever an earlier build kept
    ready_timeout_s: float | None = None  # `readyTimeout`, ours: the node's default otherwise
    credentials: str | None = field(default=None, repr=False)  # user:password, for the pull

    @property
    def files(self) -> set[str]:
        return {s.files_hash for s in self.steps if s.files_hash}

    def key(self, base_build: str, runtime: str) -> str:
        """What the build's result depends on: the base's build, the steps (COPY's by the hash
        of its files), the start and ready commands, the runsc that checkpoints, and how we
        build (this package's code)."""
        h = hashlib.sha256()
        steps = [json.dumps([s.type, s.args, s.files_hash]) for s in self.steps]
        for part in (base_build, runtime, self.start_cmd or "", self.ready_cmd or "", *steps,
                     code_version()):  # fmt: skip
            h.update(part.encode() + b"\0")
        return h.hexdigest()


def _text(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value.encode()) > MAX_ARG_BYTES:
        raise InvalidArgument(f"{key} must be a string of at most {MAX_ARG_BYTES} bytes")
    return value


def _step(index: int, raw: Any) -> Step:
    where = f"steps[{index}]"
    if not isinstance(raw, dict):
        raise InvalidArgument(f"{where} must be an object with type and args")
    kind = raw.get("type")
    if kind not in STEP_TYPES:
        raise InvalidArgument(f"{where}.type must be one of {', '.join(STEP_TYPES)}, not {kind!r}")
    args = raw.get("args") or []
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise InvalidArgument(f"{where}.args must be a list of strings")
    if any(len(a.encode()) > MAX_ARG_BYTES or "\0" in a for a in args):
        raise InvalidArgument(f"{where}.args: an argument is over {MAX_ARG_BYTES} bytes or "
                              "holds a NUL byte")  # fmt: skip
    wanted = {"RUN": (1, 2), "COPY": (2, 4), "WORKDIR": (1, 1), "USER": (1, 1)}.get(kind)
    if wanted and not (wanted[0] <= len(args) <= wanted[1] and args[0]):
        raise InvalidArgument(f"{where}: {kind} takes {wanted[0]} to {wanted[1]} arguments, "
                              f"the first not empty")  # fmt: skip
    if kind == "ENV" and (not args or len(args) % 2 or not all(args[0::2])):
        raise InvalidArgument(f"{where}: ENV takes name and value pairs")
    files_hash = raw.get("filesHash")
    if kind == "COPY" and not (isinstance(files_hash, str) and FILES_HASH_RE.match(files_hash)):
        raise InvalidArgument(f"{where}: COPY needs the filesHash of its uploaded files")
    if kind == "COPY" and len(args) == 4 and args[3] and not re.fullmatch(r"0?[0-7]{3,4}", args[3]):
        raise InvalidArgument(f"{where}: COPY mode must be octal, like 0755")
    return Step(kind, tuple(args), files_hash if kind == "COPY" else None,
                raw.get("force") is True)  # fmt: skip


def _registry_credentials(raw: Any) -> str | None:
    """`from_image(..., username=, password=)`; AWS and GCP registries are not supported."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or raw.get("type") != "registry":
        raise InvalidArgument(
            "fromImageRegistry: only type 'registry' (username and password) is supported",
            "use from_image(name, username=..., password=...)",
        )
    user, password = raw.get("username"), raw.get("password")
    if not (isinstance(user, str) and isinstance(password, str) and user and ":" not in user):
        raise InvalidArgument("fromImageRegistry needs a username (without ':') and a password")
    return f"{user}:{password}"


def _ready_timeout(raw: Any) -> float | None:
    """How long the ready command may take to succeed, in seconds: `readyTimeout` of the body
    (ours; the official client sends none, and the node's default applies)."""
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not 1 <= raw <= MAX_READY_S:
        raise InvalidArgument(f"readyTimeout must be a number of seconds from 1 to {MAX_READY_S}")
    return float(raw)


def parse(body: dict[str, Any]) -> BuildRequest:
    from_template, from_image = _text(body, "fromTemplate"), _text(body, "fromImage")
    if (from_template is None) == (from_image is None):
        raise InvalidArgument("a build starts from exactly one of fromTemplate and fromImage")
    credentials = _registry_credentials(body.get("fromImageRegistry"))
    steps = body.get("steps") or []
    if not isinstance(steps, list) or len(steps) > MAX_STEPS:
        raise InvalidArgument(f"steps must be a list of at most {MAX_STEPS}")
    return BuildRequest(
        from_template=from_template,
        from_image=from_image,
        steps=tuple(_step(i, s) for i, s in enumerate(steps)),
        start_cmd=_text(body, "startCmd") or None,
        ready_cmd=_text(body, "readyCmd") or None,
        credentials=credentials,
        force=body.get("force") is True,
        ready_timeout_s=_ready_timeout(body.get("readyTimeout")),
    )
