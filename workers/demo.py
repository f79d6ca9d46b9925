"""The demo driver: a thermostat and an LED, so a bare `indibroker start` has something to show.

An ordinary executable INDI driver (XML on stdin/stdout, standard library only), supervised like
any third-party driver. Devices: "Thermostat" (TEMPERATURE drifts toward TARGET, HEATER light)
and "LED" (LED_CONTROL On/Off). Run it alone with ``python -m indibroker.workers.demo``.
"""

from __future__ import annotations

import datetime
import os
import select
import sys
import time
import xml.etree.ElementTree as ET
from typing import Any

TICK = 2.0


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")


class Demo:
    def __init__(self) -> None:
        self.temperature = 15.0
        self.target = 20.0
        self.led = False
        self.out = sys.stdout.buffer

    def send(self, el: ET.Element) -> None:
        self.out.write(ET.tostring(el) + b"\n")
        self.out.flush()

    def _vector(self, tag: str, device: str, name: str, **attrs: str) -> ET.Element:
        return ET.Element(tag, {"device": device, "name": name, "timestamp": _now(), **attrs})

    def define(self, device: str = "", name: str = "") -> None:
        for dev, prop, build in (
            ("Thermostat", "TEMPERATURE", self._temperature),
            ("Thermostat", "TARGET", self._target),
            ("Thermostat", "HEATER", self._heater),
            ("LED", "LED_CONTROL", self._led),
        ):
            if (not device or device == dev) and (not name or name == prop):
                self.send(build("def"))

    def _number(self, kind: str, name: str, label: str, value: float, perm: str, state: str = "Ok",
                ) -> ET.Element:
        el = self._vector(f"{kind}NumberVector", "Thermostat", name, state=state)
        if kind == "def":
            el.set("perm", perm)
            el.set("label", label)
            el.set("group", "Main")
        member = ET.SubElement(el, f"{'def' if kind == 'def' else 'one'}Number", name=name)
        if kind == "def":
            member.set("label", label)
            member.set("format", "%.1f")
            member.set("min", "-50")
            member.set("max", "100")
            member.set("step", "0.5")
        member.text = f"{value:.1f}"
        return el

    def _temperature(self, kind: str) -> ET.Element:
        return self._number(kind, "TEMPERATURE", "Temperature (C)", self.temperature, "ro")

    def _target(self, kind: str) -> ET.Element:
        return self._number(kind, "TARGET", "Target (C)", self.target, "rw")

    def _heater(self, kind: str) -> ET.Element:
        el = self._vector(f"{kind}LightVector", "Thermostat", "HEATER", state="Idle")
        if kind == "def":
            el.set("label", "Heater")
            el.set("group", "Main")
        member = ET.SubElement(el, f"{'def' if kind == 'def' else 'one'}Light", name="HEATING")
        if kind == "def":
            member.set("label", "Heating")
        member.text = "Busy" if self.temperature < self.target - 0.05 else "Idle"
        return el

    def _led(self, kind: str) -> ET.Element:
        el = self._vector(f"{kind}SwitchVector", "LED", "LED_CONTROL", state="Ok")
        if kind == "def":
            el.set("label", "LED")
            el.set("group", "Main")
            el.set("perm", "rw")
            el.set("rule", "OneOfMany")
        for member_name, on in (("LED_ON", self.led), ("LED_OFF", not self.led)):
            member = ET.SubElement(el, f"{'def' if kind == 'def' else 'one'}Switch", name=member_name)
            if kind == "def":
                member.set("label", "On" if member_name == "LED_ON" else "Off")
            member.text = "On" if on else "Off"
        return el

    def handle(self, el: ET.Element) -> None:
        if el.tag == "getProperties":
            self.define(el.get("device", ""), el.get("name", ""))
        elif el.tag == "newNumberVector" and el.get("device") == "Thermostat" and el.get("name") == "TARGET":
            for member in el:
                if member.get("name") == "TARGET":
                    try:
                        self.target = max(-50.0, min(100.0, float((member.text or "").strip())))
                    except ValueError:
                        continue
            self.send(self._target("set"))
        elif el.tag == "newSwitchVector" and el.get("device") == "LED" and el.get("name") == "LED_CONTROL":
            for member in el:
                on = (member.text or "").strip() == "On"
                if member.get("name") == "LED_ON":
                    self.led = on
                elif member.get("name") == "LED_OFF" and on:
                    self.led = False
            self.send(self._led("set"))
        elif el.tag == "pingRequest":
            self.send(ET.Element("pingReply", uid=el.get("uid", "")))

    def tick(self) -> None:
        gap = self.target - self.temperature
        if abs(gap) > 0.05:
            self.temperature += max(-0.2, min(0.5, gap))
            self.send(self._temperature("set"))
            self.send(self._heater("set"))


def _parser() -> tuple[ET.XMLPullParser, list[Any]]:
    parser: ET.XMLPullParser = ET.XMLPullParser(events=("start", "end"))
    parser.feed(b"<stream>")
    return parser, []


def main() -> int:
    demo = Demo()
    parser, stack = _parser()
    fd = sys.stdin.buffer.fileno()
    next_tick = time.monotonic() + TICK
    while True:
        timeout = max(0.0, next_tick - time.monotonic())
        ready, _, _ = select.select([fd], [], [], timeout)
        if ready:
            data = os.read(fd, 65536)
            if not data:
                return 0  # the server closed our stdin: we are done
            try:
                parser.feed(data)
                for event, el in parser.read_events():  # type: ignore[misc]
                    if event == "start":
                        stack.append(el)
                        continue
                    stack.pop()
                    if len(stack) == 1:  # a whole top-level element: handle it, then let it go
                        demo.handle(el)  # type: ignore[arg-type]
                        stack[0].remove(el)
            except ET.ParseError as exc:
                sys.stderr.write(f"demo: bad input ({exc}); resetting\n")
                parser, stack = _parser()
        if time.monotonic() >= next_tick:
            next_tick = time.monotonic() + TICK
            demo.tick()


if __name__ == "__main__":
    sys.exit(main())
