"""`vivarium template build NAME --dockerfile F`: a team template, built through the API as the
official SDK builds it. The SDK is the client here too: it parses the Dockerfile into steps,
uploads what COPY needs (once: the server keeps files by their hash) and follows the build's
logs, shown with its progress display."""

from __future__ import annotations

import os
from pathlib import Path

from vivarium.cli.api_client import ApiError, Endpoints
from vivarium.config import Settings


def build_from_dockerfile(
    settings: Settings,
    name: str,
    dockerfile: Path,
    context: Path | None,
    *,
    start_cmd: str | None,
    ready_cmd: str | None,
    skip_cache: bool,
    cpu_count: int | None,
    memory_mb: int | None,
) -> str:
    """Build and return the build's id; the logs stream to the terminal as they come."""
    from e2b import Template, default_build_logger
    from e2b.exceptions import BuildException, SandboxException
    from e2b.template.main import TemplateBuilder, TemplateFinal

    endpoints = Endpoints.resolve(settings)
    if settings.tls_cert and not (os.environ.get("VIVARIUM_API_URL")
                                  or os.environ.get("E2B_API_URL")):  # fmt: skip
        # This host's own certificate: the SDK's HTTP client trusts what SSL_CERT_FILE names.
        os.environ.setdefault("SSL_CERT_FILE", str(settings.tls_cert))
    template = Template(file_context_path=str(context or dockerfile.parent))
    builder = template.from_dockerfile(dockerfile.read_text())
    final: TemplateBuilder | TemplateFinal
    if start_cmd:
        final = builder.set_start_cmd(start_cmd, ready_cmd or "true")
    elif ready_cmd:
        final = builder.set_ready_cmd(ready_cmd)
    else:
        final = builder
    try:
        info = Template.build(
            final,
            name,
            skip_cache=skip_cache,
            cpu_count=cpu_count,
            memory_mb=memory_mb,
            on_build_logs=default_build_logger(),
            api_key=endpoints.api_key,
            api_url=endpoints.api_url,
        )
    except BuildException as exc:
        raise ApiError(
            f"the build failed: {exc}", "fix the step it names and build again"
        ) from None
    except SandboxException as exc:
        raise ApiError(str(exc), "is `vivarium serve` running? (or set VIVARIUM_API_URL)") from None
    return str(info.build_id)
