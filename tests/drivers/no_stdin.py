#!/usr/bin/env python3
"""A test driver that hangs on its first command: from then on it never reads its stdin again.

Device "Hung Device" (INDIDEV overrides it) with a writable number vector VALUE. It answers every
getProperties with its definition until the first new*Vector arrives; then it sleeps forever
without reading, so whatever the server writes to it piles up in the pipe and then in the server.
"""

import os
import signal
import sys

DEVICE = os.environ.get("INDIDEV", "Hung Device")
DEFS = (
    f'<defNumberVector device="{DEVICE}" name="VALUE" label="Value" group="Main" state="Idle" perm="rw">'
    '<defNumber name="VALUE" label="Value" format="%.1f" min="0" max="100" step="1">0</defNumber>'
    "</defNumberVector>\n"
)

buf = b""
while b"<new" not in buf:
    data = os.read(0, 4096)
    if not data:
        sys.exit(0)
    buf += data
    while b"<getProperties" in buf:  # answer each getProperties once
        buf = buf[buf.index(b"<getProperties") + len(b"<getProperties"):]
        sys.stdout.write(DEFS)
        sys.stdout.flush()
sys.stderr.write("no_stdin: got a command; hanging now, never reading stdin again\n")
sys.stderr.flush()
while True:
    signal.pause()
