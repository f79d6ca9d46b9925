#!/usr/bin/env python3
"""A test driver that misbehaves on its stdout, then carries on: device "Bad" ticks a number
every 0.2 s; between ticks it writes one kind of bad input chosen by BAD_KIND."""

import os
import sys
import time

KIND = os.environ.get("BAD_KIND", "garbage")
BAD = {
    "garbage": b"\x00\xff\xfe binary garbage \x01\x02<<<>>>\n",
    "malformed": b'<setNumberVector device="Bad" name="TICK"><oneNumber name="N">1</oneText></setNumberVector>\n',
    "bomb": b'<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>'
            b'<message device="Bad" message="&lol2;"/>\n',
    "deep": b"<message>" + b"<a>" * 200 + b"</a>" * 200 + b"</message>\n",
    "oversize": b'<message device="Bad" message="' + b"x" * (3 * 1024 * 1024) + b'"/>\n',
}


def main() -> int:
    out = sys.stdout.buffer
    os.set_blocking(0, False)
    n = 0
    defined = False
    while True:
        try:
            data = os.read(0, 65536)
            if data == b"":
                return 0
            if b"getProperties" in data:
                defined = True
                out.write(b'<defNumberVector device="Bad" name="TICK" perm="ro" state="Idle">'
                          b'<defNumber name="N" format="%.0f" min="0" max="1e9" step="1">0</defNumber>'
                          b'</defNumberVector>\n')
        except BlockingIOError:
            pass
        if defined:
            n += 1
            out.write(BAD[KIND])
            out.write(b'<setNumberVector device="Bad" name="TICK" state="Ok"><oneNumber name="N">%d</oneNumber>'
                      b'</setNumberVector>\n' % n)
        out.flush()
        time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main())
