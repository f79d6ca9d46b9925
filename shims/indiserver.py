"""`indibroker-indiserver`: indiserver's command line, served by indibroker.

Tools that start `indiserver` with its options (INDI Web Manager, scripts, KStars' local mode)
can start this instead, unchanged::

    indibroker-indiserver [-p port] [-r restarts] [-m MB] [-d MB] [-f fifo] [-l dir] [-v] \\
        driver [driver ...] [device@host[:port] ...]

As indiserver: every interface is served (not only localhost), `-r` bounds a crashing driver's
restarts (ours back off between them and forgive a driver that ran stably), `-f` accepts
`start`/`stop` lines, `-u` names the local socket (abstract, `/tmp/indiserver` by default), and
the server exits with status 1 once no driver is left (without `-f`).

The port and the local socket listen first thing, before the rest of indibroker is imported (KStars connects the
moment it has launched the server; see broker/listening.py): this module imports only that at
its top.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from indibroker.broker.listening import INDI_PORT, INDISERVER_LOCAL_SOCKET, listen, listen_local

if TYPE_CHECKING:
    from indibroker.broker.config import Config

__all__ = ["main", "config_from_indiserver_args"]


def _parser() -> argparse.ArgumentParser:
    from indibroker.broker.config import Config
    from indibroker.broker.supervision import RestartPolicy

    parser = argparse.ArgumentParser(prog="indibroker-indiserver",
                                     description="indiserver's command line, served by indibroker")
    # indiserver's defaults are ours (Config, RestartPolicy): taken from there, not restated.
    parser.add_argument("-p", type=int, default=Config.port, dest="port", help=f"IP port ({Config.port})")
    parser.add_argument("-r", type=int, default=RestartPolicy.max_restarts, dest="restarts",
                        help=f"maximum driver restarts ({RestartPolicy.max_restarts})")
    parser.add_argument("-m", type=float, default=Config.client_max_mb, dest="client_max_mb",
                        help=f"kill a client this many MB behind ({Config.client_max_mb:g})")
    parser.add_argument("-d", type=float, default=Config.blob_drop_mb, dest="blob_drop_mb",
                        help=f"drop streaming BLOBs for a client this many MB behind ({Config.blob_drop_mb:g})")
    parser.add_argument("-f", dest="fifo", help="FIFO for dynamic start and stop of drivers")
    parser.add_argument("-l", dest="log_dir", help="directory for driver logs")
    parser.add_argument("-u", dest="unix_socket", default=INDISERVER_LOCAL_SOCKET,
                        help=f"local socket for clients on this machine ({INDISERVER_LOCAL_SOCKET})")
    parser.add_argument("-v", action="count", default=0, dest="verbose")
    parser.add_argument("drivers", nargs="*", metavar="driver",
                        help="executable, or [device]@host[:port] for a remote server")
    return parser


def config_from_indiserver_args(argv: list[str]) -> Config:
    from indibroker.broker.config import Config, DriverConfig, RemoteConfig
    from indibroker.broker.errors import IndibrokerError

    args = _parser().parse_args(argv)
    if not args.drivers and not args.fifo:
        raise IndibrokerError("no drivers given (and no -f FIFO to start them later)")
    config = Config(host="0.0.0.0", port=args.port, demo=False, client_max_mb=args.client_max_mb,
                    blob_drop_mb=args.blob_drop_mb, fifo=args.fifo, log_dir=args.log_dir,
                    log_level=("INFO", "INFO", "DEBUG", "TRACE")[min(args.verbose, 3)],
                    exit_when_no_drivers=not args.fifo, indiserver_messages=True,
                    local_socket=args.unix_socket)
    config.restart["max_restarts"] = args.restarts
    for driver in args.drivers:
        if "@" in driver:
            config.remotes.append(RemoteConfig.parse(driver, blob_enable=True))
        else:
            config.drivers.append(DriverConfig(argv=[driver]))
    config.validate(check_executables=False)  # as indiserver: a driver that cannot start exits
    config.assign_names()
    return config


def _early_port(argv: list[str]) -> int | None:
    """indiserver's `-p PORT` from its command line, without the argument parser (which needs
    the rest of indibroker); None if it is not a plain number (the parser then says why)."""
    port = str(INDI_PORT)
    for i, arg in enumerate(argv):
        if arg == "-p" and i + 1 < len(argv):
            port = argv[i + 1]
        elif arg.startswith("-p") and arg[2:].isdigit():
            port = arg[2:]
    return int(port) if port.isdigit() else None


def _early_local_socket(argv: list[str]) -> str:
    """indiserver's `-u PATH`, as `_early_port` takes `-p`."""
    path = INDISERVER_LOCAL_SOCKET
    for i, arg in enumerate(argv):
        if arg == "-u" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("-u") and len(arg) > 2:
            path = arg[2:]
    return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    port = _early_port(args)
    try:  # as indiserver: every interface; a port in use is then reported by `serve`
        listener = listen("0.0.0.0", port) if port is not None and "-h" not in args else None
    except OSError:
        listener = None
    try:  # a socket another server has is reported by `serve`, as indiserver exits then
        local = listen_local(_early_local_socket(args)) if listener is not None else None
    except OSError:
        local = None
    from indibroker.broker.cli import serve
    from indibroker.broker.errors import IndibrokerError

    try:
        return serve(config_from_indiserver_args(args), listener, local)
    except IndibrokerError as exc:
        sys.stderr.write(f"indibroker-indiserver: {exc}\n")
        return 1
    finally:
        for sock in (listener, local):
            if sock is not None:
                sock.close()


if __name__ == "__main__":
    sys.exit(main())
