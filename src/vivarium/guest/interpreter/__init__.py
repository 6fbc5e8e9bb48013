"""The code interpreter's front server (guest code, port 49999): E2B's `/execute` and
`/contexts` over Jupyter kernels that talk to it through Unix sockets.

Runs inside code-interpreter sandboxes with the template's python3 and its jupyter_client;
imports nothing from the host package.
"""

PORT = 49999
ENVD_PORT = 49983
