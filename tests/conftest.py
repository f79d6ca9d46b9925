"""Shared fixtures. Interop tests use the real indi-bin programs; a missing one fails, never skips."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import Broker


@pytest.fixture(scope="session")
def indi_bin() -> None:
    missing = [p for p in ("indiserver", "indi_getprop", "indi_setprop", "indi_simulator_ccd",
                           "indi_simulator_telescope") if shutil.which(p) is None]
    if missing:
        pytest.fail(f"indi-bin is not installed (missing {', '.join(missing)}): "
                    "apt-get install indi-bin, as .ci/run does")


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator:
    """Start indibroker instances with a private runtime dir; all are stopped and checked after."""
    made: list[Broker] = []

    def make(*args: str, start: bool = True, **kw: object) -> Broker:
        kw.setdefault("log_dir", tmp_path)
        kw.setdefault("runtime_dir", tmp_path / "run")
        b = Broker(*args, **kw)  # type: ignore[arg-type]
        made.append(b)
        if start:
            b.start()
        return b

    yield make
    for b in made:
        if b.proc is not None and b.proc.poll() is None:
            b.__exit__(None, None, None)


@pytest.fixture
def home(tmp_path: Path) -> dict[str, str]:
    """Drivers keep config in $HOME/.indi: give each test a clean one."""
    path = tmp_path / "home"
    path.mkdir(exist_ok=True)
    return {"HOME": str(path)}


@pytest.fixture
def run(broker_factory: Callable[..., Broker], home: dict[str, str]) -> Iterator[Callable[..., Broker]]:
    """broker_factory with a private HOME; afterwards every instance must stop cleanly and leave
    no process behind."""
    made: list[Broker] = []

    def make(*args: str, **kw: Any) -> Broker:
        kw.setdefault("env", home)
        b = broker_factory(*args, **kw)
        made.append(b)
        return b

    yield make
    for b in made:
        if b.proc is not None and b.proc.poll() is None:
            assert b.stop() == 0, b.log()
        left = b.leftovers()
        assert left == [], [p.cmdline() for p in left]
