"""`IPyServer`: indipyserver's API, with every driver object in a process of its own.

A script written for indipyserver runs unchanged apart from its import line::

    from indibroker import IPyServer
    server = IPyServer(thermostat, led, host="localhost", port=7624, maxconnections=5)
    server.add_exdriver("indi_simulator_telescope")
    asyncio.run(server.asyncrun())

`asyncrun()` starts `indibroker start` with a generated config, so the script's process only
launches and waits. How a driver object reaches its own process: the script is run again (the
same `sys.orig_argv`) with an environment variable naming the driver, and in that process
`asyncrun()` serves that one driver on stdin/stdout, supervised like any executable driver. This
is the trade-off of multiprocessing's "spawn" rather than "fork": forking a process that already
runs an event loop (and, for restarts, a ZeroMQ context) is unsafe, and a crashed driver must come
back from a clean state, not from the memory of the run that crashed. The cost: the script's
top-level code runs again in each driver's process, so it must build its drivers the same way
every time, and keep hardware access inside the driver (in `hardware()` or its event handlers),
not at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from indibroker.broker.oscalls import pdeathsig_prefix

__all__ = ["IPyServer"]

log = logging.getLogger(__name__)

ENV_DRIVER_INDEX = "INDIBROKER_IPYSERVER_DRIVER"


def _toml(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


class IPyServer:
    """Serve indipydriver drivers, executable drivers and remote servers on one port."""

    def __init__(self, *drivers: Any, host: str = "localhost", port: int = 7624, maxconnections: int = 5):
        if not isinstance(maxconnections, int) or maxconnections < 1:
            raise ValueError("maxconnections must be a positive integer")
        names: set[str] = set()
        for driver in drivers:
            for device in driver:
                if device in names:
                    raise ValueError(f"device name {device} is duplicated")
                names.add(device)
        self.drivers = list(drivers)
        self.host = host
        self.port = port
        self.maxconnections = maxconnections
        self.exdrivers: list[list[str]] = []
        self.remotes: list[dict[str, Any]] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._stop_requested = False

    def add_exdriver(self, program: str, *args: str, debug_enable: bool = False) -> None:
        self.exdrivers.append([program, *args])

    def add_remote(self, host: str, port: int, blob_enable: bool = False, debug_enable: bool = False) -> None:
        self.remotes.append({"host": host, "port": port, "blob_enable": blob_enable})

    def config_text(self) -> str:
        """The indibroker config this server runs with (TOML)."""
        lines = [f"host = {_toml(self.host)}", f"port = {_toml(self.port)}",
                 f"maxconnections = {_toml(self.maxconnections)}", "demo = false", ""]
        rerun = [sys.executable, *sys.orig_argv[1:]]
        for index, driver in enumerate(self.drivers):
            lines += ["[[driver]]", f"name = {_toml(self._driver_name(driver, index))}",
                      f"command = {_toml(rerun)}", f"env = {_toml({ENV_DRIVER_INDEX: str(index)})}",
                      "snoop_messages = false", ""]
        for argv in self.exdrivers:
            lines += ["[[driver]]", f"command = {_toml(argv)}", ""]
        for remote in self.remotes:
            lines += ["[[remote]]", *(f"{k} = {_toml(v)}" for k, v in remote.items()), ""]
        return "\n".join(lines)

    @staticmethod
    def _driver_name(driver: Any, index: int) -> str:
        devices = list(driver)
        return devices[0] if len(devices) == 1 else f"pydriver-{index}"

    async def asyncrun(self) -> None:
        index = os.environ.get(ENV_DRIVER_INDEX)
        if index is not None:
            # We are one driver's own process (see the module docstring): serve it on stdio.
            await self.drivers[int(index)].asyncrun()
            return
        workdir = Path(tempfile.mkdtemp(prefix="indibroker-ipyserver-"))
        config = workdir / "indibroker.toml"
        config.write_text(self.config_text())
        # If this script is killed outright, the server still stops in order (SIGTERM), so it
        # leaves no runtime directory behind; Ctrl-C and SIGTERM of the script stop it the same
        # way, and `asyncrun()` then returns (no KeyboardInterrupt traceback after a clean stop).
        argv = [*pdeathsig_prefix("TERM"), sys.executable, "-m", "indibroker", "start", "--config", str(config)]
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self.shutdown)
        try:
            self._proc = await asyncio.create_subprocess_exec(*argv, start_new_session=True)
            if self._stop_requested:
                self._terminate()
            await self._proc.wait()
        except asyncio.CancelledError:
            self._terminate()
            if self._proc is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._proc.wait()), 30)
            raise
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
            shutil.rmtree(workdir, ignore_errors=True)

    def _terminate(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGTERM)

    def shutdown(self, shutdownmessage: str = "") -> None:
        """Stop the server (drivers, clients and all); `asyncrun()` then returns."""
        self._stop_requested = True
        if shutdownmessage:
            log.info("%s", shutdownmessage)
        self._terminate()
