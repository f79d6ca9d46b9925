"""A Python (indipydriver) twin of tests/drivers/trigger.py: device "PyTrigger" sends VALUE.V
once whenever the file $TRIGGER_DIR/PyTrigger holds a new number."""

import asyncio
import os

from indipydriver import Device, IPyDriver, NumberMember, NumberVector

PATH = os.path.join(os.environ.get("TRIGGER_DIR", "."), "PyTrigger")


def read_trigger(current: float) -> float:
    try:
        with open(PATH) as f:
            return float(f.read().strip() or current)
    except (OSError, ValueError):
        return current


class TriggerDriver(IPyDriver):
    async def hardware(self):
        vector = self["PyTrigger"]["VALUE"]
        while not self.stop:
            await asyncio.sleep(0.02)
            new = read_trigger(vector.getfloatvalue("V"))
            if new != vector.getfloatvalue("V"):
                vector["V"] = new
                await vector.send_setVector(timeout=0)


def make() -> TriggerDriver:
    value = NumberVector(name="VALUE", label="VALUE", group="Main", perm="ro", state="Ok",
                         numbermembers=[NumberMember("V", "V", format="%g", min=0, max=1e9, step=0,
                                                     membervalue=read_trigger(0.0))])
    return TriggerDriver(Device("PyTrigger", properties=[value]))
