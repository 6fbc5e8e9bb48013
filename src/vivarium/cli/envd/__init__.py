"""A small client for a sandbox's envd, for `vivarium sandbox exec` (`run`) and `vivarium sandbox
connect` (`terminal`): `transport` speaks Connect over HTTP, `exec` and `terminal` use it."""

from .exec import run
from .terminal import terminal
from .transport import EnvdError, Verify, proxy_headers

__all__ = ["EnvdError", "Verify", "proxy_headers", "run", "terminal"]
