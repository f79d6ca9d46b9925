"""Entry point of every child process: ``python -m indibroker.workers KIND '<json spec>'``.

The arbiter normally forks its workers from itself (see `broker.arbiter`), calling `run_role`
directly; this entry runs one by hand. Module loggers stay named after their modules.
"""

from __future__ import annotations

import sys

from indibroker.broker.oscalls import keep_big_buffers


def preload() -> None:
    """Import what every role needs, so that forked workers share it with their parent."""
    import indibroker.broker.router  # noqa: F401
    import indibroker.workers.exdriver  # noqa: F401
    import indibroker.workers.gateway  # noqa: F401
    import indibroker.workers.remote  # noqa: F401


def run_role(kind: str, spec: str) -> int:
    keep_big_buffers()
    if kind == "broker":
        from indibroker.broker.router import main as broker_main

        return broker_main()
    from indibroker.workers.base import Worker

    worker: type[Worker]
    if kind == "gateway":
        from indibroker.workers.gateway import Gateway

        worker = Gateway
    elif kind == "exdriver":
        from indibroker.workers.exdriver import ExDriverWorker

        worker = ExDriverWorker
    elif kind == "remote":
        from indibroker.workers.remote import RemoteBridge

        worker = RemoteBridge
    else:
        sys.stderr.write(f"unknown worker kind {kind!r}\n")
        return 2
    return worker.main(spec)


def main() -> int:
    if len(sys.argv) < 2:
        sys.stderr.write("usage: python -m indibroker.workers KIND '<json spec>'\n")
        return 2
    return run_role(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "{}")


if __name__ == "__main__":
    sys.exit(main())
