"""Entry point of every child process: ``python -m indibroker.workers KIND '<json spec>'``.

One entry keeps module loggers named after their modules (not ``__main__``) and imports only what
the chosen role needs.
"""

from __future__ import annotations

import sys


def main() -> int:
    kind = sys.argv.pop(1) if len(sys.argv) > 1 else ""
    if kind == "broker":
        from indibroker.broker.router import main as broker_main

        return broker_main()
    if kind == "gateway":
        from indibroker.workers.gateway import Gateway

        return Gateway.main()
    if kind == "exdriver":
        from indibroker.workers.exdriver import ExDriverWorker

        return ExDriverWorker.main()
    if kind == "remote":
        from indibroker.workers.remote import RemoteBridge

        return RemoteBridge.main()
    sys.stderr.write(f"unknown worker kind {kind!r}\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
