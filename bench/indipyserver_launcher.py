#!/usr/bin/env python3
"""Serve executable INDI drivers with indipyserver's IPyServer, for the benchmarks.

    python3 bench/indipyserver_launcher.py --port 7624 "bench/flood_driver.py --device Flood1"

Each positional argument is one driver command line, given to ``IPyServer.add_exdriver``. Needs
``pip install indipyserver`` (IPyServer left indipydriver in its 3.x releases). IPyServer accepts
at most 10 clients at a time (``maxconnections`` 1 to 10).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shlex
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--port", type=int, default=7624)
    parser.add_argument("--maxconnections", type=int, default=10, help="1 to 10 (IPyServer's limit)")
    parser.add_argument("drivers", nargs="+", metavar='"CMD ARGS"', help="executable driver command lines")
    args = parser.parse_args()
    try:
        from indipyserver import IPyServer
    except ImportError:
        print("indipyserver_launcher: indipyserver is not installed (pip install indipyserver)",
              file=sys.stderr)
        return 2
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    server = IPyServer(host=args.host, port=args.port, maxconnections=args.maxconnections)
    for command in args.drivers:
        argv = shlex.split(command)
        server.add_exdriver(argv[0], *argv[1:])
    try:
        asyncio.run(server.asyncrun())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
