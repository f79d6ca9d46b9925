"""The `indibroker` command: start, check-config, status, stop, and driver control at run time."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Any

from indibroker.broker.config import LOG_LEVELS, Config, DriverConfig, RemoteConfig, load_toml
from indibroker.broker.control import driver_request, request
from indibroker.broker.errors import ConfigError, ControlError, IndibrokerError
from indibroker.broker.listening import listen, listen_local
from indibroker.broker.runtime import RuntimeDir, configure_logging

__all__ = ["main", "build_parser", "serve"]

log = logging.getLogger("indibroker")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="indibroker", description="An INDI server on a ZeroMQ backbone.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check-config", help="validate a TOML config file without starting anything")
    check.add_argument("file", metavar="FILE.toml")

    start = sub.add_parser("start", help="run the server in the foreground (Ctrl-C or SIGTERM stops it)")
    _server_args(start)
    start.add_argument("--join", metavar="tcp://ADDR:PORT", help="run as a host joined to this central server")
    start.add_argument("--host-name", dest="host_name", metavar="NAME", help="this host's name when joining")

    join = sub.add_parser("join", help="run this host's drivers as part of a central indibroker "
                                       "(docs/hosts.md); a local gateway only with --port")
    join.add_argument("endpoint", metavar="tcp://ADDR:PORT", help="the central server's --hosts-endpoint")
    join.add_argument("--name", required=True, dest="host_name", help="this host's name: its key's name")
    _server_args(join)

    keys = sub.add_parser("keys", help="make a key pair: DIR/NAME.key and DIR/NAME.key_secret")
    keys.add_argument("name", help="'server' for the central server, else the host's name")
    keys.add_argument("--dir", required=True, help="the directory to write them in")

    _more_commands(sub)
    return parser


def _server_args(start: argparse.ArgumentParser) -> None:
    """The options of `start`, which `join` shares."""
    start.add_argument("--config", metavar="FILE.toml", help="read settings from a TOML file first")
    start.add_argument("--host", help="address to listen on (default localhost; 0.0.0.0 for all)")
    start.add_argument("-p", "--port", type=int, help="TCP port for INDI clients (default 7624)")
    start.add_argument("--exdriver", action="append", default=[], metavar='"CMD ARGS"',
                       help="an executable INDI driver (repeatable)")
    start.add_argument("--driver", action="append", default=[], metavar="PACKAGE.MODULE:ATTR",
                       help="a Python (indipydriver) driver object or factory, in its own process "
                            "(repeatable)")
    start.add_argument("--remote", action="append", default=[], metavar="[DEVICE@]HOST[:PORT]",
                       help="serve another INDI server's devices (repeatable; indiserver's form)")
    start.add_argument("--remote-blobs", action="store_true", dest="remote_blobs",
                       help="also pass BLOBs from the --remote servers")
    start.add_argument("--local-socket", dest="local_socket", metavar="PATH",
                       help="also serve local clients on this unix socket (abstract on Linux; "
                            "indiserver's -u, whose default is /tmp/indiserver): BLOBs reach them as "
                            "shared memory buffers")
    start.add_argument("--gateways", type=int, help="client gateway processes sharing the port")
    start.add_argument("--maxconnections", type=int, help="most clients at once (0: unlimited)")
    start.add_argument("--allow", action="append", default=[], metavar="CIDR",
                       help="clients may connect only from these networks (repeatable; default: any)")
    start.add_argument("--read-only", action="append", default=[], dest="read_only", metavar="CIDR",
                       help="clients from these networks may watch but not change anything (repeatable)")
    start.add_argument("--max-per-address", type=int, dest="max_connections_per_address", metavar="N",
                       help="connections at once from one address (0: unlimited)")
    start.add_argument("-r", "--max-restarts", type=int, dest="max_restarts",
                       help="consecutive restarts of a crashing driver before giving up (0: never restart)")
    start.add_argument("-d", "--blob-drop-mb", type=float, dest="blob_drop_mb",
                       help="MB a client may fall behind before its streaming BLOBs are dropped (5)")
    start.add_argument("-m", "--client-max-mb", type=float, dest="client_max_mb",
                       help="MB a client may fall behind before it is disconnected (128)")
    start.add_argument("-f", "--fifo", help="indiserver-style FIFO for start/stop lines")
    start.add_argument("--log-dir", dest="log_dir", help="directory for per-driver log files")
    start.add_argument("--runtime-dir", dest="runtime_dir", help="base directory for runtime state")
    start.add_argument("--no-demo", action="store_true", help="do not serve the demo driver when idle")
    start.add_argument("--server-device", dest="server_device", metavar="NAME",
                       help="name of the INDI device showing and operating the server (indibroker)")
    start.add_argument("--no-server-device", action="store_const", const="", dest="server_device",
                       help="serve no such device")
    start.add_argument("-v", "--verbose", action="count", default=0,
                       help="-v events (the default), -vv a line per message with its connection and "
                            "direction, -vvv each message's XML")
    start.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    start.add_argument("--hosts-endpoint", dest="hosts_endpoint", metavar="tcp://ADDR:PORT",
                       help="accept joining hosts on this TCP endpoint (CURVE; docs/hosts.md)")
    start.add_argument("--keys", metavar="DIR", help="the key directory for --hosts-endpoint or joining")
    start.add_argument("--host-heartbeat", type=float, dest="host_heartbeat", metavar="SECONDS",
                       help="a joined host's heartbeat: lost after three silent ones (2)")


def _more_commands(sub: Any) -> None:
    for name, text in (("status", "show every process of a running instance"),
                       ("stop", "stop a running instance")):
        cmd = sub.add_parser(name, help=text)
        _instance_args(cmd)
        if name == "status":
            cmd.add_argument("--json", action="store_true", help="machine-readable output")

    level = sub.add_parser("loglevel", help="set the log level of a running instance, every process")
    level.add_argument("level", type=str.upper, choices=LOG_LEVELS)
    _instance_args(level)

    driver = sub.add_parser("driver", help="start, stop or restart a driver at run time")
    driver.add_argument("action", choices=["start", "stop", "restart"])
    driver.add_argument("name", help="driver name (as in status), or an executable to start")
    driver.add_argument("args", nargs="*", help="arguments for a new executable driver")
    _instance_args(driver)


def _instance_args(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("-p", "--port", type=int, default=7624, help="the instance's port (7624)")
    cmd.add_argument("--runtime-dir", dest="runtime_dir", help="base directory for runtime state")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("indibroker")
    except PackageNotFoundError:
        return "(not installed)"


def config_from_args(args: argparse.Namespace) -> Config:
    config = load_toml(args.config) if args.config else Config()
    for key in ("host", "port", "gateways", "maxconnections", "blob_drop_mb", "client_max_mb",
                "fifo", "log_dir", "runtime_dir", "max_connections_per_address", "local_socket",
                "server_device", "hosts_endpoint", "keys", "join", "host_name", "host_heartbeat"):
        value = getattr(args, key, None)
        if value is not None:
            setattr(config, key, value)
            config.sources[key] = "--" + key.replace("_", "-")
    for key in ("allow", "read_only"):
        if getattr(args, key):
            setattr(config, key, [*getattr(config, key), *getattr(args, key)])
            config.sources[key] = "--" + key.replace("_", "-")
    if args.max_restarts is not None:
        config.restart["max_restarts"] = args.max_restarts
    for command in args.exdriver:
        argv = shlex.split(command)
        if not argv:
            raise ConfigError("--exdriver: empty command")
        config.drivers.append(DriverConfig(argv=argv))
    for remote in args.remote:
        config.remotes.append(RemoteConfig.parse(remote, blob_enable=args.remote_blobs))
    for spec in args.driver:
        config.drivers.append(DriverConfig.python(spec))
    if args.no_demo:
        config.demo = False
    if args.quiet:
        config.log_level, config.sources["log_level"] = "WARNING", "-q"
    elif args.verbose:  # as indiserver's: -v events, -vv a line per message, -vvv its XML
        config.log_level = ("INFO", "DEBUG", "TRACE")[min(args.verbose, 3) - 1]
        config.sources["log_level"] = "-" + "v" * args.verbose
    if config.join:  # a joined host: its drivers, a gateway for local clients only with a port
        config.demo = False
        if "port" not in config.sources:
            config.gateways = 0
    config.validate()
    config.assign_names()
    return config


def cmd_join(args: argparse.Namespace) -> int:
    args.join = args.endpoint
    return serve(config_from_args(args))


def cmd_keys(args: argparse.Namespace) -> int:
    from indibroker.broker.hosts import make_keys

    public, secret = make_keys(args.name, args.dir)
    sys.stdout.write(f"wrote {public} (give it out) and {secret} (keep it on this host)\n")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_toml(args.file)
    config.validate()
    config.assign_names()
    sys.stdout.write(f"{args.file}: ok ({len(config.drivers)} driver(s), {len(config.remotes)} remote(s), "
                     f"port {config.port})\n")
    return 0


def _runtime(args: argparse.Namespace, port: int) -> RuntimeDir:
    base = Path(args.runtime_dir) if getattr(args, "runtime_dir", None) else None
    return RuntimeDir.for_port(port, base)


def cmd_start(args: argparse.Namespace) -> int:
    return serve(config_from_args(args))


def serve(config: Config, listener: socket.socket | None = None,
          local_listener: socket.socket | None = None) -> int:
    """Run an instance in the foreground until SIGTERM or Ctrl-C (also the indiserver shim's,
    which passes the sockets it listened on first thing)."""
    from indibroker.broker.arbiter import Arbiter  # the other commands need none of this

    configure_logging("arbiter", logging.getLevelName(config.log_level.upper()))
    runtime = _runtime(argparse.Namespace(runtime_dir=config.runtime_dir), config.port)
    runtime.acquire()
    try:
        # Listen before the workers' code is imported and before any driver starts: a client
        # connecting meanwhile waits in the backlog instead of being refused.
        listeners = [listener or listen_or_fail(config.host, config.port)] if listener or config.gateways else []
        listeners += [listen_or_fail(config.host, config.port) for _ in range(1, config.gateways)]
        if config.local_socket and local_listener is None:
            local_listener = listen_local_or_fail(config.local_socket)
        # Workers are forked from this process: import what they run now, once, and keep the
        # collector away from it, so that every worker shares these pages instead of copying them.
        from indibroker.workers.__main__ import preload

        preload()
        gc.freeze()
        arbiter = Arbiter(config, runtime, listeners=listeners, local_listener=local_listener)
        return arbiter.run()
    finally:
        runtime.release()


def listen_local_or_fail(path: str) -> socket.socket:
    """The local socket, listening; a clear one-line error if another server has it."""
    try:
        return listen_local(path)
    except OSError as exc:
        raise ConfigError(f"cannot listen on local socket {path}: {exc.strerror or exc}") from None


def listen_or_fail(host: str, port: int) -> socket.socket:
    """The clients' port, listening; a clear one-line error if anything else serves it."""
    try:
        return listen(host, port)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _format_status(rows: list[dict[str, Any]]) -> str:
    def fmt_uptime(value: float | None) -> str:
        if value is None:
            return "-"
        value = int(value)
        if value >= 3600:
            return f"{value // 3600}h{value % 3600 // 60:02d}m"
        return f"{value // 60}m{value % 60:02d}s"

    header = ["ROLE", "NAME", "PID", "STATE", "RESTARTS", "UPTIME", "CPU%", "RSS(MB)", "DEVICES/CLIENTS"]
    table = [header]
    for row in rows:
        if row["role"] == "driver":
            extra = ", ".join(row.get("devices", []))
        elif row["role"] == "host":  # a joined host: its link's state since when
            since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row["link_since"])) \
                if row.get("link_since") else ""
            extra = f"link {row.get('link')} since {since}"
        elif "remote" in row:  # a bridge: where it points and whether it is connected, since when
            since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row["link_since"])) \
                if row.get("link_since") else ""
            extra = f"{row['remote']} {row.get('link', '')} since {since}"
            if row.get("link") != "connected" and row.get("last_error"):
                extra += f" ({row['last_error']})"
        else:
            extra = f"{row['clients']} client(s)" if "clients" in row else ""
        if row.get("state") in ("BACKOFF", "FATAL", "STOPPED") and row.get("last_exit"):
            extra = f"{extra}  (last exit: {row['last_exit']})".strip()  # why, not only that
        table.append([
            row["role"], row["name"], str(row.get("pid") or "-"), str(row.get("state")),
            str(row.get("restarts", 0)), fmt_uptime(row.get("uptime")),
            "-" if row.get("cpu_percent") is None else f"{row['cpu_percent']:.1f}",
            "-" if row.get("rss") is None else f"{row['rss'] / 1048576:.1f}", extra,
        ])
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table)


def _running(args: argparse.Namespace) -> RuntimeDir:
    """The runtime directory of the instance on `args.port`; ControlError if none runs there."""
    runtime = _runtime(args, args.port)
    if not runtime.is_live():
        raise ControlError(f"no indibroker runs on port {args.port}")
    return runtime


def cmd_status(args: argparse.Namespace) -> int:
    reply = request(_running(args).control_path, {"cmd": "status"})
    if args.json:
        sys.stdout.write(json.dumps(reply["status"], indent=2) + "\n")
    else:
        sys.stdout.write(_format_status(reply["status"]) + "\n")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    runtime = _running(args)
    pid = runtime.read_pid()
    request(runtime.control_path, {"cmd": "stop"})
    deadline = time.monotonic() + 30
    while runtime.is_live() and time.monotonic() < deadline:
        time.sleep(0.1)
    if runtime.is_live():
        raise ControlError("indibroker did not stop within 30 s")
    sys.stdout.write(f"stopped indibroker on port {args.port} (pid {pid})\n")
    return 0


def cmd_driver(args: argparse.Namespace) -> int:
    argv = [args.name, *args.args] if args.action == "start" else None
    reply = request(_running(args).control_path, driver_request(args.action, args.name, argv))
    sys.stdout.write(f"{args.action} {reply.get('name', args.name)}: ok\n")
    return 0


def cmd_loglevel(args: argparse.Namespace) -> int:
    reply = request(_running(args).control_path, {"cmd": "loglevel", "level": args.level})
    sys.stdout.write(f"log level {reply['level']}: ok\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"start": cmd_start, "check-config": cmd_check_config, "status": cmd_status, "stop": cmd_stop,
                "driver": cmd_driver, "loglevel": cmd_loglevel, "join": cmd_join, "keys": cmd_keys}
    try:
        return commands[args.command](args)
    except IndibrokerError as exc:
        sys.stderr.write("".join(f"indibroker: {line}\n" for line in str(exc).splitlines()))
        return 1
    except OSError as exc:
        sys.stderr.write(f"indibroker: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
