#!/usr/bin/env python3
"""A test driver: device "Ticker" sends its wall-clock time every 20 ms (for latency)."""

import os
import select
import sys
import time


def main() -> int:
    defined = False
    while True:
        ready, _, _ = select.select([0], [], [], 0.02)
        if ready:
            data = os.read(0, 65536)
            if not data:
                return 0
            if b"getProperties" in data:
                os.write(1, b'<defNumberVector device="Ticker" name="T" perm="ro" state="Idle">'
                            b'<defNumber name="T" format="%.6f" min="0" max="1e12" step="0">0</defNumber>'
                            b'</defNumberVector>\n')
                defined = True
        if defined:
            os.write(1, b'<setNumberVector device="Ticker" name="T" state="Ok"><oneNumber name="T">%.6f'
                        b'</oneNumber></setNumberVector>\n' % time.time())


if __name__ == "__main__":
    sys.exit(main())
