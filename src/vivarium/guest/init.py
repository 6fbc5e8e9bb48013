"""PID 1 of every sandbox until envd takes its place: reap orphans, stop on SIGTERM.

Guest code: runs inside the sandbox with the template's python3; imports nothing from the host
package and only the standard library.
"""

import os
import signal
import sys
import time

READY_FILE = "/run/vivarium-ready"


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    os.makedirs(os.path.dirname(READY_FILE), exist_ok=True)
    with open(READY_FILE, "w") as f:
        f.write(str(time.time()))
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            time.sleep(3600)
        except InterruptedError:
            continue


if __name__ == "__main__":
    main()
