#!/usr/bin/env python3
"""A test driver slow to die: defines device argv[1]; on SIGTERM it takes 1.5 s to exit (a camera
closing), or with --ignore-term it ignores SIGTERM altogether (only SIGKILL ends it)."""

import os
import select
import signal
import sys
import time

DEVICE = sys.argv[1] if len(sys.argv) > 1 else "Slow"
IGNORE = "--ignore-term" in sys.argv


def on_term(signum: int, frame: object) -> None:
    if IGNORE:
        return
    time.sleep(1.5)
    sys.exit(0)


def main() -> int:
    signal.signal(signal.SIGTERM, on_term)
    while True:
        ready, _, _ = select.select([0], [], [], 1.0)
        if not ready:
            continue
        data = os.read(0, 65536)
        if not data:
            time.sleep(0.2)  # stdin gone: linger like a driver tidying up, until killed
            continue
        if b"getProperties" in data:
            os.write(1, f'<defSwitchVector device="{DEVICE}" name="CONNECTION" perm="rw" rule="OneOfMany" '
                        f'state="Idle"><defSwitch name="CONNECT">Off</defSwitch>'
                        f'<defSwitch name="DISCONNECT">On</defSwitch></defSwitchVector>\n'.encode())


if __name__ == "__main__":
    sys.exit(main())
