"""An indipyserver-style script, served by indibroker: only the IPyServer import differs.

The dew heater (dew_heater.py, beside this file) and the telescope simulator from indi-bin, on
one port. Run it:

    python3 dew_heater_server.py          # port 7624
    python3 dew_heater_server.py 7625     # another port

Each driver object runs in a process of its own: this script is run again there (with the same
arguments), so build the drivers the same way every time and touch hardware only from the
driver's own code. Ctrl-C stops everything.
"""

import asyncio
import sys

from dew_heater import make_driver

from indibroker import IPyServer  # was: from indipyserver import IPyServer

if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 7624
    server = IPyServer(make_driver(), host="localhost", port=port, maxconnections=5)
    server.add_exdriver("indi_simulator_telescope")
    asyncio.run(server.asyncrun())
