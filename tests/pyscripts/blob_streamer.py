#!/usr/bin/env python3
"""A test driver: device "Streamer" sends a BLOB of SIZE bytes every INTERVAL seconds, each
followed by a setNumberVector SEQ carrying its sequence number (so loss is counted)."""

import base64
import os
import select
import sys
import time

SIZE = int(os.environ.get("STREAM_BLOB_BYTES", 1_000_000))
INTERVAL = float(os.environ.get("STREAM_INTERVAL", 0.05))
DEVICE = "Streamer"


def main() -> int:
    out = sys.stdout.buffer
    payload = base64.b64encode(os.urandom(SIZE))
    seq = 0
    streaming = False
    next_at = time.monotonic()
    while True:
        ready, _, _ = select.select([0], [], [], max(0.0, next_at - time.monotonic()) if streaming else None)
        if ready:
            data = os.read(0, 65536)
            if not data:
                return 0
            if b"getProperties" in data:
                out.write(
                    b'<defBLOBVector device="Streamer" name="FRAME" perm="ro" state="Idle">'
                    b'<defBLOB name="IMAGE" label="image"/></defBLOBVector>\n'
                    b'<defNumberVector device="Streamer" name="SEQ" perm="ro" state="Idle">'
                    b'<defNumber name="N" format="%.0f" min="0" max="1e9" step="1">0</defNumber>'
                    b'</defNumberVector>\n')
                out.flush()
                streaming = True
        if streaming and time.monotonic() >= next_at:
            seq += 1
            out.write(b'<setBLOBVector device="Streamer" name="FRAME" state="Ok">'
                      b'<oneBLOB name="IMAGE" size="%d" format=".bin" seq="%d">' % (SIZE, seq)
                      + payload + b"</oneBLOB></setBLOBVector>\n"
                      + b'<setNumberVector device="Streamer" name="SEQ" state="Ok">'
                        b'<oneNumber name="N">%d</oneNumber></setNumberVector>\n' % seq)
            out.flush()
            next_at += INTERVAL


if __name__ == "__main__":
    sys.exit(main())
