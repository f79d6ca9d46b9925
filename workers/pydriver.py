"""A Python driver's own process: runs one indipydriver `IPyDriver` speaking INDI on stdin/stdout.

The driver object is found by an importable spec, ``package.module:attribute``, where the
attribute is the driver object or a factory (class or function) returning one. The process is
supervised by an exdriver worker exactly like a third-party executable driver: same state machine,
backoff, FATAL and status. A driver whose code raises ends this process only; it is restarted and
its devices are defined again.

    python -m indibroker.workers.pydriver package.module:attribute
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any

__all__ = ["load", "run", "argv_for", "spec_in"]

log = logging.getLogger(__name__)


def load(spec: str) -> Any:
    """Resolve ``module:attribute`` (dots allowed after the colon) to a driver object."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"driver spec {spec!r}: expected package.module:attribute")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # a driver module in the working directory, as `python -m` finds it
    obj: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        obj = getattr(obj, part)
    if not hasattr(obj, "asyncrun") and callable(obj):
        obj = obj()  # a factory
    if not hasattr(obj, "asyncrun"):
        raise TypeError(f"driver spec {spec!r} is not a driver object or a factory of one")
    return obj


def run(driver: Any) -> int:
    """Serve `driver` on stdin/stdout until it stops or the supervisor ends us."""
    import asyncio  # here, not at the top: the arbiter imports this module for `spec_in` alone

    asyncio.run(driver.asyncrun())
    return 0


def spec_in(argv: list[str]) -> str | None:
    """The ``module:attribute`` a command line made by `argv_for` serves (None for any other)."""
    return argv[-1] if len(argv) == 5 and argv[1:4] == ["-P", "-m", __name__] else None


def argv_for(spec: str) -> list[str]:
    # -P: the working directory must not shadow our package; load() adds it back for the driver.
    return [sys.executable, "-P", "-m", "indibroker.workers.pydriver", spec]


def main() -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO)  # stdout carries INDI only
    if len(sys.argv) != 2:
        sys.stderr.write("usage: python -m indibroker.workers.pydriver package.module:attribute\n")
        return 2
    return run(load(sys.argv[1]))


if __name__ == "__main__":
    sys.exit(main())
