"""An indipyserver-style script: only its import line differs from one written for indipyserver.

Drivers: "thermo" (a thermostat whose hardware loop updates TEMPERATURE), "led" (a switch that
answers), "crashy" (raises in its event handler when told, or in its hardware loop when
CRASH_IN_HARDWARE is set in its environment), and "snooper" (copies the telescope's coordinates,
which it snoops, into its own SNOOPED vector).
"""

import asyncio
import os
import sys

from indipydriver import (
    Device,
    IPyDriver,
    NumberMember,
    NumberVector,
    SwitchMember,
    SwitchVector,
)

from indibroker import IPyServer

SCOPE = "Telescope Simulator"


class ThermoDriver(IPyDriver):
    async def hardware(self):
        temp = self["thermo"]["TEMPERATURE"]
        while not self.stop:
            await asyncio.sleep(0.3)
            temp["TEMP"] = temp.getfloatvalue("TEMP") + 0.5
            await temp.send_setVector(timeout=0)


class LedDriver(IPyDriver):
    async def rxevent(self, event):
        if event.devicename == "led" and event.vectorname == "LED":
            for name, value in event.items():
                event.vector[name] = value
            await event.vector.send_setVector(state="Ok")


class CrashyDriver(IPyDriver):
    async def rxevent(self, event):
        if event.devicename == "crashy" and event.vectorname == "CRASH" and event.get("BOOM") == "On":
            raise RuntimeError("crashing on purpose (rxevent)")

    async def hardware(self):
        if os.environ.get("CRASH_IN_HARDWARE"):
            await asyncio.sleep(1.0)
            raise RuntimeError("crashing on purpose (hardware)")


class SnooperDriver(IPyDriver):
    async def hardware(self):
        while not self.stop:
            await self.send_getProperties(SCOPE, "EQUATORIAL_EOD_COORD")
            await asyncio.sleep(2)

    async def snoopevent(self, event):
        if event.devicename == SCOPE and event.vectorname == "EQUATORIAL_EOD_COORD" and "RA" in event:
            vector = self["snooper"]["SNOOPED"]
            vector["RA"] = event["RA"]
            vector["DEC"] = event["DEC"]
            await vector.send_setVector(timeout=0)


def number(name, members):
    return NumberVector(name=name, label=name, group="Main", perm="ro", state="Ok",
                        numbermembers=[NumberMember(m, m, format="%.4f", min=-1000, max=1000, step=0,
                                                    membervalue=0) for m in members])


def switch(name, members):
    return SwitchVector(name=name, label=name, group="Main", perm="rw", rule="AnyOfMany", state="Idle",
                        switchmembers=[SwitchMember(m, m, membervalue="Off") for m in members])


def make_thermo():
    return ThermoDriver(Device("thermo", properties=[number("TEMPERATURE", ["TEMP"])]))


def make_led():
    return LedDriver(Device("led", properties=[switch("LED", ["LED_ON", "LED_OFF"])]))


def make_crashy():
    return CrashyDriver(Device("crashy", properties=[switch("CRASH", ["BOOM"])]))


def make_snooper():
    return SnooperDriver(Device("snooper", properties=[number("SNOOPED", ["RA", "DEC"])]))


if __name__ == "__main__":
    port, maxconnections = int(sys.argv[1]), int(sys.argv[2])
    server = IPyServer(make_thermo(), make_led(), make_crashy(), make_snooper(),
                       host="localhost", port=port, maxconnections=maxconnections)
    server.add_exdriver("indi_simulator_telescope")
    asyncio.run(server.asyncrun())
