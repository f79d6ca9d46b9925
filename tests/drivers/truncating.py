#!/usr/bin/env python3
"""A test driver that botches a write: device argv[1] answers each getProperties with half a vector
(cut mid-member, as a driver that crashes or overruns a buffer mid-write), then, with argv[2]
"pause", nothing for 2 s, then good vectors GOOD1 and GOOD2. Without "pause" the good ones follow
at once, so the first begins inside the unfinished one."""

import os
import select
import sys
import time

DEVICE = sys.argv[1]
PAUSE = len(sys.argv) > 2 and sys.argv[2] == "pause"


def good(name: str) -> bytes:
    return (f'<defNumberVector device="{DEVICE}" name="{name}" perm="ro" state="Ok">'
            f'<defNumber name="V" format="%g" min="0" max="9" step="0">1</defNumber>'
            f'</defNumberVector>\n').encode()


def main() -> int:
    while True:
        ready, _, _ = select.select([0], [], [], 1.0)
        if not ready:
            continue
        data = os.read(0, 65536)
        if not data:
            return 0
        if b"getProperties" in data:  # every time: a client's may come after the worker's own
            os.write(1, f'<defNumberVector device="{DEVICE}" name="HALF" perm="ro" state="Ok">'
                        f'<defNumber name="V" format="%g" min="0" max="9" step="0">1'.encode())
            if PAUSE:
                time.sleep(2.0)
            os.write(1, good("GOOD1") + good("GOOD2"))


if __name__ == "__main__":
    sys.exit(main())
