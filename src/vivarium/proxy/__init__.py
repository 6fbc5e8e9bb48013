"""The sandbox proxy: one plain-HTTP listener that forwards each request to a sandbox's port.

The e2b client sends all sandbox traffic to one `sandbox_url` and names the target with the
`E2b-Sandbox-Id` / `E2b-Sandbox-Port` headers (or `{port}-{id}.{domain}` as host name). The
caller supplies a resolver from sandbox id to `Upstream` (address and instance key).

    proxy = SandboxProxy(lambda sid: table.get(sid), domain=None)
    await proxy.start("0.0.0.0", 3001)
    ...
    proxy.forget(sandbox_id)  # when it is killed
    await proxy.stop()
"""

from vivarium.proxy.server import (
    ProxyLimits,
    Refusal,
    Resolver,
    SandboxProxy,
    Upstream,
    Waker,
)

__all__ = ["ProxyLimits", "Refusal", "Resolver", "SandboxProxy", "Upstream", "Waker"]
