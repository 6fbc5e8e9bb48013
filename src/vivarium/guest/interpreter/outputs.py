"""Jupyter iopub messages -> the lines of E2B's `/execute` stream (one JSON object each)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from .display import CHART_MIME, DATA_MIME

# MIME type -> the key E2B's Result uses. Images and PDF arrive base64-encoded already.
MIME_KEYS = {
    "text/plain": "text",
    "text/html": "html",
    "text/markdown": "markdown",
    "image/svg+xml": "svg",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "application/pdf": "pdf",
    "text/latex": "latex",
    "application/json": "json",
    "application/javascript": "javascript",
    CHART_MIME: "chart",  # display.py: what a matplotlib figure holds
    DATA_MIME: "data",  # display.py: a DataFrame's columns
}


def line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, default=str).encode() + b"\n"


def timestamp(msg: dict[str, Any]) -> str:
    date = msg.get("header", {}).get("date")
    if isinstance(date, datetime):
        return date.isoformat()
    return str(date) if date else datetime.now(UTC).isoformat()


def result(bundle: dict[str, Any], *, main: bool, quotes: str = "'") -> dict[str, Any]:
    """`quotes`: those a string's text is shown in by its language (E2B's text has none)."""
    out: dict[str, Any] = {"type": "result", "is_main_result": main}
    extra: dict[str, Any] = {}
    for mime, value in bundle.items():
        key = MIME_KEYS.get(mime)
        if key is None:
            extra[mime] = value
        elif key in ("json", "chart", "data") and not isinstance(value, dict):
            extra[mime] = value  # the client's Result.json is a dict
        elif (
            key == "text"
            and isinstance(value, str)
            and len(value) > 1
            and value[0] in quotes
            and value[-1] == value[0]
        ):
            out[key] = value[1:-1]
        else:
            out[key] = value.rstrip("\n") if key in ("png", "jpeg", "pdf") else value
    if extra:
        out["extra"] = extra
    return out


def convert(msg: dict[str, Any], quotes: str = "'") -> dict[str, Any] | None:
    """One iopub message of an execution as a stream line, or None if the client has no use for
    it (status, execute_input and comm traffic are handled or ignored by the caller)."""
    kind = msg["msg_type"]
    content = msg["content"]
    if kind == "stream":
        name = "stderr" if content.get("name") == "stderr" else "stdout"
        return stream(name, content.get("text", ""), timestamp(msg))
    if kind == "execute_result":
        return result(content.get("data", {}), main=True, quotes=quotes)
    if kind in ("display_data", "update_display_data"):
        return result(content.get("data", {}), main=False, quotes=quotes)
    if kind == "error":
        return error(content.get("ename", "Error"), content.get("evalue", ""),
                     content.get("traceback") or [])  # fmt: skip
    return None


def stream(name: str, text: str, when: str | None = None) -> dict[str, Any]:
    return {"type": name, "text": text, "timestamp": when or datetime.now(UTC).isoformat()}


def error(name: str, value: str, traceback: list[str] | str) -> dict[str, Any]:
    text = traceback if isinstance(traceback, str) else "\n".join(traceback)
    return {"type": "error", "name": name, "value": value, "traceback": text}
