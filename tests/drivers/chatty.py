#!/usr/bin/env python3
"""A test driver that talks on stderr: a start line with its marker, and one line per command.

Usage: chatty.py MARKER. Defines device "Chatty" (a switch vector PING) and answers every
getProperties with its definition, logging "MARKER: got <tag>" to stderr for each element read.
Exits when its stdin closes.
"""

import os
import re
import sys

MARKER = sys.argv[1] if len(sys.argv) > 1 else "chatty"
DEVICE = os.environ.get("INDIDEV", "Chatty")
DEFS = (
    f'<defSwitchVector device="{DEVICE}" name="PING" label="Ping" group="Main" state="Idle" perm="rw"'
    ' rule="AnyOfMany"><defSwitch name="PING" label="Ping">Off</defSwitch></defSwitchVector>\n'
)


def log(text: str) -> None:
    sys.stderr.write(f"{MARKER}: {text}\n")
    sys.stderr.flush()


log("started")
fd = sys.stdin.fileno()
buf = ""
while True:
    data = os.read(fd, 65536)
    if not data:
        log("stdin closed, bye")
        break
    buf += data.decode(errors="replace")
    end = buf.rfind(">") + 1  # look only at text up to the last complete tag
    done, buf = buf[:end], buf[end:]
    for tag in re.findall(r"<(\w+)[\s/>]", done):
        log(f"got {tag}")
        if tag == "getProperties":
            sys.stdout.write(DEFS)
            sys.stdout.flush()
