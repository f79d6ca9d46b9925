#!/usr/bin/env python3
"""A test driver whose one value changes only when told: device argv[1] (else $TRIGGER_DEVICE,
else "Trigger") defines VALUE.V and, whenever the file $TRIGGER_DIR/<device> holds a new number,
sends it once in a setNumberVector and then stays quiet. A client that missed that one message
has only a re-definition to learn the current value from."""

import os
import select
import sys

DEVICE = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("TRIGGER_DEVICE", "Trigger")
PATH = os.path.join(os.environ.get("TRIGGER_DIR", "."), DEVICE)


def vector(kind: str, value: str) -> bytes:
    if kind == "def":
        return (f'<defNumberVector device="{DEVICE}" name="VALUE" state="Ok" perm="ro">'
                f'<defNumber name="V" format="%g" min="0" max="1e9" step="0">{value}</defNumber>'
                f'</defNumberVector>\n').encode()
    return (f'<setNumberVector device="{DEVICE}" name="VALUE" state="Ok">'
            f'<oneNumber name="V">{value}</oneNumber></setNumberVector>\n').encode()


def read_trigger(current: str) -> str:
    try:
        with open(PATH) as f:
            return f.read().strip() or current
    except OSError:
        return current


def main() -> int:
    value = read_trigger("0")
    while True:
        ready, _, _ = select.select([0], [], [], 0.02)
        if ready:
            data = os.read(0, 65536)
            if not data:
                return 0
            if b"getProperties" in data:
                os.write(1, vector("def", value))
        new = read_trigger(value)
        if new != value:
            value = new
            os.write(1, vector("set", value))


if __name__ == "__main__":
    sys.exit(main())
