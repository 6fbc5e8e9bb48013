"""Settings for the whole suite, applied before any test module imports the `e2b` client."""

import os

# Tests talk to sandboxes at their slot addresses, which are reused by later sandboxes. The
# client pools keep-alive connections per address for 300 s by default; a pooled connection to a
# sandbox that was killed meets a reset when the next sandbox on that address is tested. Real
# clients talk to one proxy address and are not affected. (E2B_KEEPALIVE_EXPIRY is the client's
# documented setting, read when `e2b.api` is imported.)
os.environ.setdefault("E2B_KEEPALIVE_EXPIRY", "0.2")
