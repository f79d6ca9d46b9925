#!/usr/bin/env python3
"""A test driver that leaves a mark when it starts ($MARK_FILE), then defines device "Marked" on
each getProperties."""

import os
import sys

open(os.environ["MARK_FILE"], "w").close()
while True:
    data = os.read(0, 65536)
    if not data:
        sys.exit(0)
    if b"getProperties" in data:
        os.write(1, b'<defSwitchVector device="Marked" name="CONNECTION" perm="rw" rule="OneOfMany" state="Idle">'
                    b'<defSwitch name="CONNECT">Off</defSwitch><defSwitch name="DISCONNECT">On</defSwitch>'
                    b'</defSwitchVector>\n')
