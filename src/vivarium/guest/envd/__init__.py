"""envd: the daemon inside every sandbox, speaking E2B's process and filesystem protocol.

Guest code: it runs inside sandboxes, imports only the standard library and the packages the
template vendors into /opt/vivarium/lib, and never imports host code (relative imports only).
"""

ENVD_VERSION = "0.6.13"  # the E2B envd version whose protocol we implement
PORT = 49983
# Where a sandbox finds the volumes it was created with, one directory per volume name (the
# node's hub, node/volumes.py); /init mounts each at the path asked for.
VOLUME_HUB = "/opt/vivarium/volumes"
