#!/usr/bin/env python3
"""A test driver that floods its stdout as fast as the pipe takes it: device "Flood"."""

import os
import sys


def main() -> int:
    os.read(0, 65536)  # the server's getProperties
    os.write(1, b'<defNumberVector device="Flood" name="SEQ" perm="ro" state="Idle">'
                b'<defNumber name="N" format="%.0f" min="0" max="1e12" step="1">0</defNumber></defNumberVector>\n')
    n = 0
    while True:
        batch = []
        for _ in range(500):
            n += 1
            batch.append(b'<setNumberVector device="Flood" name="SEQ" state="Ok">'
                         b'<oneNumber name="N">%d</oneNumber></setNumberVector>\n' % n)
        os.write(1, b"".join(batch))


if __name__ == "__main__":
    sys.exit(main())
