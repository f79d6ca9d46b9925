"""The arbiter: the process the user started. It starts, watches and stops every other process.

It holds no INDI state and no ZeroMQ context, so there is almost nothing in it that can crash.
Each child gets the read end of its own lifeline pipe: if the arbiter dies, even by SIGKILL, every
worker sees EOF and exits with its drivers. The arbiter restarts crashed children with backoff,
stops them in order (gateways, drivers, broker last: SIGTERM, wait, SIGKILL of the group), answers
the control socket and, with `-f`, an indiserver-style FIFO. It runs on the workers' event loop
(`workers/reactor.Reactor`: epoll, timers, signals through one self-pipe), without its ZeroMQ
part; idle, it wakes only for the liveness check.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from indibroker.broker.config import LOG_LEVELS, Config, DriverConfig, driver_name
from indibroker.broker.control import ControlServer
from indibroker.broker.fifo import FifoReader
from indibroker.broker.hosts import host_rows
from indibroker.broker.oscalls import (
    ForkedProcess,
    Forker,
    describe_exit,
    fork_child,
    signal_group,
    wait_exits,
)
from indibroker.broker.runtime import ENV_LIFELINE, ENV_LOGLEVEL, RuntimeDir, status_age
from indibroker.broker.supervision import Lifecycle, RestartPolicy
from indibroker.workers.reactor import Reactor, Timer
from indibroker.workers.settings import (
    EXIT_NO_DRIVERS,
    DriverSettings,
    ExDriverSettings,
    GatewaySettings,
    Inheritance,
    WorkerSettings,
)

__all__ = ["Arbiter", "Child"]

log = logging.getLogger(__name__)

STOP_TIMEOUT = 8.0
GATEWAY_START_WAIT = 1.0  # seconds clients may wait in the backlog for the drivers to define
# The backbone processes must always come back: quick, many restarts, never flapping to FATAL.
WORKER_POLICY = RestartPolicy(max_restarts=1000, backoff_initial=0.2, backoff_max=5.0,
                              stable_after=10.0, flap_max_exits=0)


@dataclass
class Child:
    """One supervised worker process (or the broker)."""

    role: str  # broker, gateway, exdriver, remote
    settings: WorkerSettings
    drivers: list[DriverSettings] = field(default_factory=list)  # an exdriver worker's, as they stand
    inheritance: Inheritance = field(default_factory=Inheritance)  # told to its next start
    finished: bool = False  # an exdriver worker with no driver left (indiserver's exit rule)
    lifecycle: Lifecycle = field(default_factory=lambda: Lifecycle(WORKER_POLICY))
    proc: ForkedProcess | None = None
    lifeline: int = -1  # our write end of its lifeline pipe
    started_wall: float | None = None
    restart_timer: Timer | None = None  # its backoff after a crash

    @property
    def name(self) -> str:
        return self.settings.name

    def settings_now(self) -> WorkerSettings:
        """Its settings for a start now (an exdriver worker's drivers change at run time)."""
        if isinstance(self.settings, ExDriverSettings):
            return dataclasses.replace(self.settings, drivers=tuple(self.drivers))
        return self.settings

    def tell(self, command: dict[str, Any]) -> None:
        if self.lifeline >= 0:
            try:
                os.write(self.lifeline, json.dumps(command).encode() + b"\n")
            except OSError as exc:
                log.warning("could not tell %s %s: %s", self.name, command.get("cmd"), exc)


class Arbiter:
    """Built without starting anything; `run()` starts the tree and serves until stopped. A test
    drives `start()` and the reactor itself, with a fake `forker` (broker/oscalls.fork_child's
    signature), so that nothing is forked."""

    def __init__(self, config: Config, runtime: RuntimeDir, *, reactor: Reactor | None = None,
                 forker: Forker = fork_child, listeners: list[socket.socket] | None = None,
                 local_listener: socket.socket | None = None):
        self.config = config
        # The clients' port, listening since start-up (broker/listening.py): one socket per
        # gateway, which inherits its own.
        self.listeners = listeners or []
        self.local_listener = local_listener  # the local socket (`-u`), shared by every gateway
        self.runtime = runtime
        self.children: list[Child] = []
        self.reactor = reactor or Reactor()
        self._fork = forker
        self._stopping = False
        self.exit_status = 0  # what `run()` returns
        self.control = ControlServer(runtime.control_path, self._command)
        self.fifo: FifoReader | None = None
        self._psutil_cache: dict[int, Any] = {}
        self.started_wall = time.time()
        self._build_children()

    # -- the process tree -------------------------------------------------------------------
    def _build_children(self) -> None:
        cfg = self.config
        if not cfg.join:  # a joined host's workers use the central server's broker (docs/hosts.md)
            self.children.append(Child("broker", cfg.broker_settings()))
        drivers = list(cfg.drivers)
        if not drivers and not cfg.remotes and cfg.demo and not cfg.fifo:
            drivers.append(DriverConfig(argv=[sys.executable, "-P", "-m", "indibroker.workers.demo"],
                                        name="demo"))
        for i in range(cfg.gateways if cfg.join else max(1, cfg.gateways)):
            # The first gateway hosts the server device (workers/serverdevice.py), except on a
            # joined host: the central server's device shows the whole installation.
            settings = cfg.gateway_settings(i, server_device=i == 0 and not cfg.join)
            if i < len(self.listeners):
                settings = dataclasses.replace(settings, listen_fd=self.listeners[i].fileno())
            if self.local_listener is not None:
                settings = dataclasses.replace(settings, local_fd=self.local_listener.fileno())
            self.children.append(Child("gateway", settings))
        for remote in cfg.remotes:
            self.children.append(Child("remote", remote.settings(cfg)))
        groups = max(1, min(cfg.exdriver_workers, len(drivers)))
        for i in range(groups if drivers else 0):
            self._new_exdriver_worker(i)
        for n, driver in enumerate(drivers):
            self._exdriver_workers()[n % groups].drivers.append(driver.settings(cfg))

    def _exdriver_workers(self) -> list[Child]:
        return [c for c in self.children if c.role == "exdriver"]

    def _new_exdriver_worker(self, index: int) -> Child:
        child = Child("exdriver", self.config.exdriver_settings(index, []))
        self.children.append(child)
        return child

    def _start(self, child: Child) -> None:
        if child.restart_timer is not None:
            child.restart_timer.cancel()
            child.restart_timer = None
        child.lifecycle.start()
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        link = self.config.join_link()
        env = {**self.runtime.env(), **(link.env() if link else {}), ENV_LIFELINE: str(read_end),
               ENV_LOGLEVEL: str(logging.getLevelName(self.config.log_level.upper()))}
        from indibroker.workers.__main__ import run_role

        settings, inheritance = child.settings_now(), child.inheritance
        try:
            keep = [read_end]
            if isinstance(settings, GatewaySettings):
                keep += [fd for fd in (settings.listen_fd, settings.local_fd) if fd >= 0]
            child.proc = self._fork(lambda: run_role(child.role, settings, inheritance), env,
                                    keep_fds=keep, name=f"ib-{child.name}")
        except OSError as exc:
            os.close(read_end)
            os.close(write_end)
            log.error("cannot start %s: %s", child.name, exc)
            self._exited(child, f"cannot start: {exc}")
            return
        os.close(read_end)
        child.inheritance = dataclasses.replace(inheritance, orphaned=())  # told once, to the worker just started
        child.lifeline = write_end
        child.started_wall = time.time()
        child.lifecycle.spawned(time.monotonic())
        log.info("%s started (pid %d)", child.name, child.proc.pid)

    def _reap(self) -> None:
        for child in self.children:
            if child.proc is not None:
                code = child.proc.poll()
                if code is not None:
                    if code == EXIT_NO_DRIVERS and child.role == "exdriver":
                        self._no_drivers_left(child)
                    self._exited(child, describe_exit(code))

    def _exited(self, child: Child, how: str) -> None:
        if child.lifeline >= 0:
            os.close(child.lifeline)
            child.lifeline = -1
        pid = child.proc.pid if child.proc is not None else None
        child.proc = None
        if pid is not None:
            signal_group(pid, signal.SIGKILL)  # anything left in its session goes with it
            if child.role == "exdriver":
                self._sweep_drivers(child)
        decision = child.lifecycle.exited(time.monotonic(), how)
        if self._stopping or decision.action == "stopped":
            log.info("%s stopped (%s)", child.name, how)
            return
        if decision.action == "restart":
            log.warning("%s exited (%s); restarting in %.1f s", child.name, how, decision.delay)
            child.restart_timer = self.reactor.call_later(decision.delay, lambda: self._restart(child))
        else:
            log.error("%s exited (%s); %s", child.name, how, decision.reason)

    def _no_drivers_left(self, child: Child) -> None:
        """An exdriver worker whose drivers are all gone for good (indiserver's rule, asked for
        by `exit_when_no_drivers`): it is not restarted; with no driver left anywhere (remote
        bridges count as drivers), the whole server exits with status 1, as indiserver does."""
        child.lifecycle.stop()  # its exit is then "stopped", not a crash to restart
        child.finished = True
        if all(c.finished for c in self.children if c.role == "exdriver") and \
                not any(c.role == "remote" for c in self.children):
            log.error("no driver left: exiting (as indiserver does without -f)")
            self.exit_status = 1
            self._stop("no driver left")

    def _sweep_drivers(self, child: Child) -> None:
        """A dead exdriver worker's drivers must not outlive it: kill their sessions. Its
        successor is told their devices, to tell clients they are gone until restarted."""
        status = self.runtime.read_status().get(child.name, {})
        orphaned: list[str] = []
        for driver in status.get("drivers", []):
            orphaned += [d for d in driver.get("devices", []) if isinstance(d, str)]
            pid = driver.get("pid")
            if isinstance(pid, int) and pid > 1:
                if signal_group(pid, signal.SIGKILL):
                    log.info("killed driver %s (pid %d) left by %s", driver.get("name"), pid, child.name)
        child.inheritance = dataclasses.replace(child.inheritance, orphaned=tuple(sorted(set(orphaned))))

    def _restart(self, child: Child) -> None:
        """Its backoff has passed."""
        child.restart_timer = None
        if self._stopping:
            return
        self._start(child)
        if child.role == "broker":
            # Workers would notice within a heartbeat; telling them makes it immediate.
            self.reactor.call_later(0.3, lambda: self._tell_all({"cmd": "hello"}))

    def _check_liveness(self) -> None:
        """A worker alive but silent (hung in a loop, stopped) is killed; its exit restarts it."""
        if self._stopping:
            return
        limit = self.config.worker_liveness
        now = time.monotonic()
        for child in self.children:
            started = child.lifecycle.started_at
            if child.proc is None or started is None or now - started < limit:
                continue
            age = status_age(self.runtime, child.name)
            if age is not None and age > limit:
                log.error("%s (pid %d) has shown no sign of life for %.0f s: killing it",
                          child.name, child.proc.pid, age)
                signal_group(child.proc.pid, signal.SIGKILL)
        self.reactor.call_later(limit / 3, self._check_liveness)

    def _tell_all(self, command: dict[str, Any]) -> None:
        for child in self.children:
            if child.role != "broker":
                child.tell(command)

    # -- stopping ---------------------------------------------------------------------------
    def _stop(self, why: str) -> None:
        if not self._stopping:
            log.info("stopping (%s)", why)
        self._stopping = True
        self.reactor.stop()

    def stop_all(self) -> None:
        """Gateways first (no new work), then drivers, the broker last; SIGTERM, wait, SIGKILL."""
        self._stopping = True
        for roles in (("gateway",), ("exdriver", "remote"), ("broker",)):
            self._stop_group({c.proc: c for c in self.children if c.role in roles and c.proc is not None})

    def _stop_group(self, group: dict[ForkedProcess, Child]) -> None:
        for proc, child in group.items():
            child.lifecycle.stop()
            signal_group(proc.pid, signal.SIGTERM)
        stuck = wait_exits(list(group), STOP_TIMEOUT, lambda proc: self._exited(group[proc], "stopped"))
        for proc in stuck:
            log.warning("%s did not stop in %.0f s: killing its process group", group[proc].name, STOP_TIMEOUT)
            signal_group(proc.pid, signal.SIGKILL)
        wait_exits(stuck, None, lambda proc: self._exited(group[proc], "killed"))

    # -- control commands -------------------------------------------------------------------
    def _command(self, request: dict[str, Any]) -> dict[str, Any]:
        cmd = request.get("cmd")
        if cmd == "status":  # "usage": false skips the CPU and memory figures (a cheap poll)
            return {"ok": True, "status": self.status(usage=request.get("usage", True) is not False)}
        if cmd == "loglevel":
            return self._set_log_level(str(request.get("level", "")))
        if cmd == "stop":
            self._stop("stop command")  # the loop ends after this turn: the reply goes out first
            return {"ok": True}
        if cmd == "driver":
            return self._driver_command(request.get("action", ""), request.get("name", ""),
                                        request.get("argv"), request.get("env") or {})
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    def _find_driver(self, name: str) -> tuple[Child, DriverSettings] | None:
        for child in self._exdriver_workers():
            for driver in child.drivers:
                if driver.name == name or os.path.basename(driver.argv[0]) == name:
                    return child, driver
        return None

    def _driver_command(self, action: str, name: str, argv: list[str] | None,
                        env: dict[str, str]) -> dict[str, Any]:
        found = self._find_driver(name) if name else None
        if action == "start" and found is None:
            if not argv:
                return {"ok": False, "error": f"no driver named {name!r}"}
            taken = {d.name for c in self._exdriver_workers() for d in c.drivers}
            config = DriverConfig(argv=list(argv), env=dict(env))
            config.name = driver_name(config.argv, config.env, taken)  # INDIDEV (-n), else the program
            driver = config.settings(self.config)
            workers = self._exdriver_workers()
            if not workers:
                worker = self._new_exdriver_worker(0)
                worker.drivers.append(driver)
                self._start(worker)
            else:
                worker = min(workers, key=lambda c: len(c.drivers))
                worker.drivers.append(driver)
                worker.tell({"cmd": "driver", "action": "add", "settings": driver.to_dict()})
            return {"ok": True, "name": driver.name}
        if found is None:
            return {"ok": False, "error": f"no driver named {name!r}"}
        worker, driver = found
        if action not in ("start", "stop", "restart"):
            return {"ok": False, "error": f"unknown driver action {action!r}"}
        stopped = worker.inheritance.stopped - {driver.name}
        if action == "stop":
            stopped |= {driver.name}
        worker.inheritance = dataclasses.replace(worker.inheritance, stopped=stopped)
        worker.tell({"cmd": "driver", "action": action, "name": driver.name})
        return {"ok": True, "name": driver.name}

    def _set_log_level(self, level: str) -> dict[str, Any]:
        """The arbiter's level, and every child's (told over its lifeline); children started
        later inherit it."""
        level = level.upper()
        if level not in LOG_LEVELS:
            return {"ok": False, "error": f"log level {level!r}: expected one of {', '.join(LOG_LEVELS)}"}
        self.config.log_level = level
        logging.getLogger().setLevel(logging.getLevelName(level))
        for child in self.children:
            child.tell({"cmd": "loglevel", "level": level})
        log.info("log level now %s", level)
        return {"ok": True, "level": level}

    def status(self, usage: bool = True) -> list[dict[str, Any]]:
        """One row per process. Without `usage`, no CPU and memory figures: psutil reads /proc
        for each process, too much for a poll every half second (workers/serverdevice.py)."""
        files = self.runtime.read_status()
        rows: list[dict[str, Any]] = [{
            "role": "arbiter", "name": "arbiter", "pid": os.getpid(), "state": "RUNNING", "restarts": 0,
            "uptime": round(time.time() - self.started_wall, 1), **self._usage(os.getpid(), usage),
            "last_exit": "", "log_level": self.config.log_level,
        }]
        for child in self.children:
            info = files.get(child.name, {})
            row = self._row(child.name, child.role, child.proc.pid if child.proc else None,
                            child.lifecycle, child.started_wall, usage)
            if child.role == "gateway":
                row["clients"] = info.get("clients", 0)
            if child.role == "gateway" and "connections" in info:
                row["connections"] = info["connections"]
            if child.role == "broker":
                row["devices"] = info.get("devices", [])
                row.update({k: info[k] for k in ("messages", "bytes") if k in info})
            if child.role == "remote":  # where it points, and the link's state since when
                row.update({k: info[k] for k in ("remote", "link", "link_since", "last_error", "devices")
                            if k in info})
            rows.append(row)
            if child.role == "broker":  # then the joined hosts, as they report themselves
                rows.extend(host_rows(info.get("hosts", {})))
            for driver in info.get("drivers", []) if child.role == "exdriver" else []:
                rows.append({
                    "role": "driver", "name": driver["name"], "pid": driver.get("pid"),
                    "state": driver.get("state"), "restarts": driver.get("restarts", 0),
                    "operator_restarts": driver.get("operator_restarts", 0),
                    "uptime": self._uptime(driver.get("started"), driver.get("pid")),
                    **self._usage(driver.get("pid"), usage), "devices": driver.get("devices", []),
                    "worker": child.name, "last_exit": driver.get("last_exit", ""),
                })
        return rows

    def _row(self, name: str, role: str, pid: int | None, lc: Lifecycle, started: float | None,
             usage: bool) -> dict:
        return {"role": role, "name": name, "pid": pid, "state": lc.state.value,
                "restarts": lc.restarts, "uptime": self._uptime(started, pid), **self._usage(pid, usage),
                "last_exit": lc.last_exit}

    @staticmethod
    def _uptime(started: float | None, pid: int | None) -> float | None:
        return round(time.time() - started, 1) if started and pid else None

    def _usage(self, pid: int | None, usage: bool = True) -> dict[str, Any]:
        if not usage:
            return {}
        if not pid:
            return {"cpu_percent": None, "rss": None}
        import psutil  # only `status` needs it: keep it out of the arbiter's idle footprint

        proc = self._psutil_cache.get(pid)
        try:
            if proc is None:
                proc = self._psutil_cache[pid] = psutil.Process(pid)
                proc.cpu_percent(None)  # the first reading is meaningless; primes the counter
            return {"cpu_percent": proc.cpu_percent(None), "rss": proc.memory_info().rss}
        except psutil.Error:
            self._psutil_cache.pop(pid, None)
            return {"cpu_percent": None, "rss": None}

    # -- main loop --------------------------------------------------------------------------
    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
            self.reactor.on_signal(signum, self._on_signal)
        try:
            self.start()
            self.reactor.run()
        finally:
            signal.set_wakeup_fd(-1)  # the reactor's self-pipe closes with it; signals are only recorded now
            self.close()
        return self.exit_status

    def start(self) -> None:
        """Serve the control socket (and the FIFO) and start every child, the broker first."""
        self.control.attach(self.reactor)
        if self.config.fifo:
            self.fifo = FifoReader(self.config.fifo, self._fifo_line)
            self.fifo.attach(self.reactor)
        for child in self.children:  # the broker is first in the list
            if child.role != "gateway":
                self._start(child)
        # Clients wait in the listening socket's backlog until the drivers' workers have
        # registered and their drivers defined their devices: a client's first getProperties
        # then reaches its drivers, and it sees each definition once (as under indiserver,
        # which starts its drivers before it accepts).
        self._gateways_when_ready(time.monotonic() + GATEWAY_START_WAIT)
        self.reactor.call_later(self.config.worker_liveness / 3, self._check_liveness)
        if self.config.join:
            log.info("joining %s as host %s", self.config.join, self.config.host_name)
        log.info("indibroker serving on %s:%d (%d gateway(s), %d driver(s)); runtime %s",
                 self.config.host, self.config.port,
                 sum(c.role == "gateway" for c in self.children),
                 sum(len(c.drivers) for c in self.children), self.runtime.path)

    def _gateways_when_ready(self, deadline: float) -> None:
        if self._stopping:
            return
        if time.monotonic() < deadline and not self._drivers_settled():
            self.reactor.call_later(0.02, lambda: self._gateways_when_ready(deadline))
            return
        for child in self.children:
            if child.role == "gateway" and child.proc is None and child.restart_timer is None:
                self._start(child)

    def _drivers_settled(self) -> bool:
        """Every driver's worker has published a status in which each driver has defined a
        device or is not running (crashed and backing off, gave up, stopped): clients may come
        in. Only a driver running and not yet defined holds them back (at most 1 s)."""
        files = self.runtime.read_status()
        for child in self._exdriver_workers():
            info = files.get(child.name)
            if child.proc is None or info is None or info.get("pid") != child.proc.pid:
                if not child.finished:
                    return False
                continue
            for driver in info.get("drivers", []):
                if driver.get("state") in ("STARTING", "RUNNING") and not driver.get("devices"):
                    return False
        return True

    def close(self) -> None:
        """Stop every child in order, then close what the arbiter serves."""
        self.stop_all()
        for listener in self.listeners:
            listener.close()
        if self.local_listener is not None:
            self.local_listener.close()
        self.control.close()
        if self.fifo is not None:
            self.fifo.close()
        self.reactor.close()

    def _on_signal(self, signum: int) -> None:
        if signum == signal.SIGCHLD:
            self._reap()
        elif signum in (signal.SIGTERM, signal.SIGINT):
            self._stop(signal.Signals(signum).name)
        elif signum == signal.SIGHUP:
            log.info("SIGHUP ignored")

    def _fifo_line(self, action: str, driver: str, env: dict[str, str]) -> None:
        name = env.get("INDIDEV", "")
        if action == "start":
            found = self._find_driver(name or driver)
            if found is not None and found[1].argv[0] == driver:
                reply = self._driver_command("start", found[1].name, None, {})
            else:
                reply = self._driver_command("start", name, [driver], env)
        else:
            reply = self._driver_command("stop", name or os.path.basename(driver), None, {})
        if not reply.get("ok"):
            log.warning("FIFO %s %s: %s", action, driver, reply.get("error"))
