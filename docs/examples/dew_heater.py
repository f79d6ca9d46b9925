"""A dew heater controller, written with indipydriver and served by indibroker.

One device, "Dew Heater": TEMPERATURE (read-only, the lens), TARGET (what to hold it at, settable)
and POWER (read-only, how hard the heater works, in %). The hardware is simulated here: replace
`read_lens_temperature` and `set_heater_power` with your own calls.

Serve it, from this directory (or with it on PYTHONPATH):

    indibroker start --driver dew_heater:make_driver

and look:

    indi_getprop "Dew Heater.*.*"
    indi_setprop "Dew Heater.TARGET.TARGET=8"
"""

import asyncio

from indipydriver import Device, IPyDriver, NumberMember, NumberVector

DEVICE = "Dew Heater"


class Lens:
    """A simulated lens in 0 C night air: full heater power would hold it at 10 C."""

    def __init__(self) -> None:
        self.temperature = 2.0
        self.power = 0.0

    def read_lens_temperature(self) -> float:
        settles_at = self.power / 10  # C, at this power
        self.temperature += 0.1 * (settles_at - self.temperature)
        return self.temperature

    def set_heater_power(self, percent: float) -> None:
        self.power = percent


class DewHeater(IPyDriver):
    """Holds the lens at TARGET: a proportional controller, once a second."""

    async def rxevent(self, event):
        # A client's newNumberVector for TARGET: take it, clamp it, tell every client.
        if event.devicename == DEVICE and event.vectorname == "TARGET" and "TARGET" in event:
            target = min(30.0, max(-10.0, event.getfloatvalue("TARGET")))
            event.vector["TARGET"] = target
            await event.vector.send_setVector(state="Ok")

    async def hardware(self):
        # Runs as long as the driver does; touch the hardware only from here and rxevent.
        lens = self.driverdata["lens"]
        device = self[DEVICE]
        while not self.stop:
            await asyncio.sleep(1)
            temperature = lens.read_lens_temperature()
            target = device["TARGET"].getfloatvalue("TARGET")
            power = min(100.0, max(0.0, (target - temperature) * 50))
            lens.set_heater_power(power)
            device["TEMPERATURE"]["TEMPERATURE"] = round(temperature, 2)
            device["POWER"]["POWER"] = round(power, 1)
            await device["TEMPERATURE"].send_setVector(timeout=0)
            await device["POWER"].send_setVector(timeout=0)


def number(name: str, label: str, perm: str, value: float, low: float, high: float) -> NumberVector:
    member = NumberMember(name, label, format="%.1f", min=low, max=high, step=0.5, membervalue=value)
    return NumberVector(name=name, label=label, group="Main", perm=perm, state="Ok", numbermembers=[member])


def make_driver() -> DewHeater:
    """What `--driver dew_heater:make_driver` calls, in the driver's own process."""
    device = Device(DEVICE, properties=[
        number("TEMPERATURE", "Lens (C)", "ro", 2.0, -40, 60),
        number("TARGET", "Target (C)", "rw", 5.0, -10, 30),
        number("POWER", "Power (%)", "ro", 0.0, 0, 100),
    ])
    return DewHeater(device, lens=Lens())


if __name__ == "__main__":
    # Run alone, it speaks INDI on stdin and stdout like any executable driver.
    asyncio.run(make_driver().asyncrun())
