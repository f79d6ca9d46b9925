"""-v / -vv / -vvv as indiserver's levels mean: events; one line per message with its connection
and direction; the XML of every message."""

from __future__ import annotations

import re

import pytest
from support import setprop, wait_until

pytestmark = pytest.mark.usefixtures("indi_bin")


@pytest.fixture
def home(tmp_path) -> dict[str, str]:
    (tmp_path / "home").mkdir()
    return {"HOME": str(tmp_path / "home")}


def test_vvv_shows_the_xml_of_a_setprop_and_the_drivers_answer(broker_factory, home):
    b = broker_factory("-vvv", "--exdriver", "indi_simulator_telescope", env=home)
    setprop(b.port, "Telescope Simulator.CONNECTION.CONNECT=On")
    client_in = re.compile(r"client 127\.0\.0\.1:\d+ -> <newSwitchVector device=.Telescope Simulator. "
                           r"name=.CONNECTION.>\s*<oneSwitch name=.CONNECT.>\s*On", re.S)
    wait_until(lambda: client_in.search(b.log()), 15, what="the client's newSwitchVector in the log")
    wait_until(lambda: re.search(r"driver indi_simulator_telescope <- <newSwitchVector device=.Telescope Simulator.",
                                 b.log()), 15, what="the command as written to the driver")
    answer = re.compile(r"driver indi_simulator_telescope -> <setSwitchVector\s+device=.Telescope Simulator.\s+"
                        r"name=.CONNECTION.")
    wait_until(lambda: answer.search(b.log()), 15, what="the driver's answer")


def test_vv_shows_one_line_per_message_and_the_default_none(broker_factory, home):
    b = broker_factory("-vv", "--exdriver", "indi_simulator_telescope", env=home)
    setprop(b.port, "Telescope Simulator.CONNECTION.CONNECT=On")
    wait_until(lambda: re.search(r"client 127\.0\.0\.1:\d+ -> newSwitchVector Telescope Simulator\.CONNECTION "
                                 r"\(\d+ bytes\)", b.log()), 15, what="a summary line")
    assert "<newSwitchVector" not in b.log()  # no XML at -vv
    quiet = broker_factory("--exdriver", "indi_simulator_telescope", env=home)
    setprop(quiet.port, "Telescope Simulator.CONNECTION.CONNECT=On")
    wait_until(lambda: "client 127.0.0.1" in quiet.log(), 10, what="the client's connection event")
    assert "newSwitchVector" not in quiet.log()
