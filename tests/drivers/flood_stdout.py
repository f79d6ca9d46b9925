#!/usr/bin/env python3
"""A test driver that floods its stdout: setNumberVector after setNumberVector, as fast as it can.

Device "Flood" (INDIDEV overrides it). It writes its definition first, then updates forever; it
never reads stdin (it does not need to: a flooding driver is judged on what it writes).
"""

import os
import sys

DEVICE = os.environ.get("INDIDEV", "Flood")
out = sys.stdout.buffer
out.write(
    f'<defNumberVector device="{DEVICE}" name="COUNTER" label="Counter" group="Main" state="Ok" perm="ro">'
    '<defNumber name="N" label="N" format="%.0f" min="0" max="1e12" step="1">0</defNumber>'
    "</defNumberVector>\n".encode()
)
out.flush()
n = 0
try:
    while True:
        batch = []
        for _ in range(200):
            n += 1
            batch.append(f'<setNumberVector device="{DEVICE}" name="COUNTER" state="Ok">'
                         f'<oneNumber name="N">{n}</oneNumber></setNumberVector>\n')
        out.write("".join(batch).encode())
        out.flush()
except BrokenPipeError:  # the server closed our stdout: we are done
    sys.exit(0)
