"""Entry point of every worker process: `run_role`, called in a child the arbiter forked.

Workers are forked from the preloaded arbiter (see `broker.arbiter`), which hands each one its
typed settings and what it inherits from its predecessor; nothing is serialised on the way.
"""

from __future__ import annotations

from indibroker.broker.oscalls import keep_big_buffers
from indibroker.workers.settings import Inheritance, WorkerSettings


def preload() -> None:
    """Import what every role needs, so that forked workers share it with their parent."""
    import indibroker.broker.router  # noqa: F401
    import indibroker.workers.exdriver  # noqa: F401
    import indibroker.workers.gateway  # noqa: F401
    import indibroker.workers.remote  # noqa: F401
    import indibroker.workers.serverdevice  # noqa: F401


def run_role(kind: str, settings: WorkerSettings, inheritance: Inheritance) -> int:
    keep_big_buffers()
    if kind == "broker":
        from indibroker.broker.router import main as broker_main

        return broker_main(settings)
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
        raise ValueError(f"unknown worker kind {kind!r}")
    return worker.main(settings, inheritance)
