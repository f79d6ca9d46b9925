"""indilib 1.9.9's own server integration tests (integs/, gtest) against indibroker-indiserver.

Run by default (``INDIBROKER_INTEGS=0`` skips them). The tests are built by tests/integs/build.sh
into ``$INTEGS_DIR`` (default /var/cache/indibroker-integs); when that build is missing this module
runs build.sh itself if it can (root, as in CI: a minute or two, once), else skips. Each gtest case runs alone through
tests/integs/run.py (its own network, PID and mount namespaces when unshare works), in both
variants: ``plain`` (the test client connects over TCP) and ``shm`` (-DENABLE_INDI_SHARED_MEMORY,
what upstream builds on Linux: the client connects over the local socket ``-u``).

``INDIBROKER_INTEGS_SERVER`` picks another server (e.g. /usr/bin/indiserver, which passes every
case); the expected failures below apply to indibroker-indiserver only.

EXPECTED_FAILURES are the cases that fail by design, each with its reason; a case on it that
passes fails this module (strict), so the list stays true.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
INTEGS = HERE / "integs"
ENABLED = os.environ.get("INDIBROKER_INTEGS", "1") != "0"

with warnings.catch_warnings():  # the marker is not registered in pyproject.toml (yet)
    warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
    _integs_mark = pytest.mark.integs

pytestmark = [
    _integs_mark,
    pytest.mark.skipif(not ENABLED, reason="indilib integs: INDIBROKER_INTEGS=0 skips them"),
    pytest.mark.timeout(60),
]


def _load_runner():
    spec = importlib.util.spec_from_file_location("indibroker_integs_run", INTEGS / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


run = _load_runner()

SUITE_EXECUTABLE = {
    "XmlAwaiter": "XmlAwaiterTest",
    "IndiserverSingleDriver": "TestIndiserverSingleDriver",
    "TestClientQueries": "TestClientQueries",
    "TestIndiSetProperties": "TestIndiSetProp",
    "IndiclientTcpConnect": "TestIndiClient",
}
_COMMON = [
    "XmlAwaiter.SimpleFragment",
    "XmlAwaiter.SimpleAttribute",
    "IndiserverSingleDriver.MissingDriver",
    "IndiserverSingleDriver.ReplyToPing",
    "IndiserverSingleDriver.DontLeakFds",
    "IndiserverSingleDriver.DontForwardUnaskedBlobDefToClient",
    "IndiserverSingleDriver.DontForwardOtherBlobDefToClient",
    "IndiserverSingleDriver.DropMisbehavingDriver",
    "IndiserverSingleDriver.ForwardBase64BlobToIPClient",
]
_SHM_ONLY = [
    "IndiserverSingleDriver.ForwardBase64BlobToUnixClient",
    "IndiserverSingleDriver.ForwardAttachedBlobToUnixClient",
    "IndiserverSingleDriver.ForwardAttachedBlobToIPClient",
]
_TAIL = [
    "TestClientQueries.ServerForwardRequest",
    "TestClientQueries.ServerForwardRequestOfHalfDeadClient",
    "TestIndiSetProperties.SetFirstPropertyUntyped",
    "TestIndiSetProperties.SetFirstPropertyTyped",
    "TestIndiSetProperties.SetLastProperty",
    "TestIndiSetProperties.SetLastPropertyTyped",
    "IndiclientTcpConnect.ClientConnect",
]
# What indilib 1.9.9's integs hold, in gtest's order (checked against the build below).
CASES = {"plain": _COMMON + _TAIL, "shm": _COMMON + _SHM_ONLY + _TAIL}

# The two differences that are by design (docs/comparison.md; tests/integs/README.md has the
# upstream lines each case checks): every other case passes.
TEXT = "text re-serialised as indiserver does: '>' newline trimmed-text (compared byte for byte)"
FDCOUNT = ("/proc/<pid>/fd of the process the test started must grow by one per client: "
           "clients live in ib-gateway, not in the arbiter (by design, multi-process)")

_FAIL_BY_DESIGN = {
    "IndiserverSingleDriver.DontLeakFds": FDCOUNT,
    "TestClientQueries.ServerForwardRequest": TEXT,
    "TestClientQueries.ServerForwardRequestOfHalfDeadClient": TEXT,
    "TestIndiSetProperties.SetFirstPropertyUntyped": TEXT,
    "TestIndiSetProperties.SetFirstPropertyTyped": TEXT,
    "TestIndiSetProperties.SetLastProperty": TEXT,
    "TestIndiSetProperties.SetLastPropertyTyped": TEXT,
}

# Measured 2026-12 against indibroker-indiserver: 15 of 29 server cases pass; these 14 fail, by
# design, and only these (a case here that passes fails the test, so the list stays true).
EXPECTED_FAILURES: dict[tuple[str, str], list[str]] = {
    (variant, case): [why] for variant in ("plain", "shm") for case, why in _FAIL_BY_DESIGN.items()
}


def _server() -> str:
    return os.environ.get("INDIBROKER_INTEGS_SERVER", "indibroker-indiserver")


def _is_indibroker(server: str) -> bool:
    return "indibroker" in os.path.basename(server)


def _built(build: Path) -> bool:
    return all(os.access(build / v / "integs" / e, os.X_OK)
               for v in run.VARIANTS for e in ("fakedriver", *run.EXECUTABLES))


@pytest.fixture(scope="module")
def integs_build() -> Path:
    build = Path(run.DEFAULT_BUILD)
    if not _built(build):
        if os.geteuid() != 0:
            pytest.skip(f"no integs build in {build} and not root to run tests/integs/build.sh")
        proc = subprocess.run(["bash", str(INTEGS / "build.sh")], capture_output=True, text=True,
                              timeout=1800, env=dict(os.environ, INTEGS_DIR=str(build)))
        if proc.returncode != 0 or not _built(build):
            pytest.fail(f"tests/integs/build.sh failed:\n{proc.stderr[-4000:]}")
    return build


@pytest.fixture(scope="module")
def trees(integs_build: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    server = shutil.which(_server()) or _server()
    if not os.access(server, os.X_OK):
        pytest.fail(f"server {server!r} not found (pip install -e . provides indibroker-indiserver)")
    server = os.path.abspath(server)
    root = tmp_path_factory.mktemp("integs")
    works = {v: run.make_tree(root / v, run.check_build(integs_build, v), server) for v in run.VARIANTS}
    logs = root / "logs"
    logs.mkdir()
    return {"server": server, "works": works, "logs": logs,
            "isolation": "netns" if run.netns_works() else "none"}


def test_the_build_holds_the_listed_cases(trees: dict) -> None:
    for variant, work in trees["works"].items():
        assert [c.id for c in run.list_cases(work)] == CASES[variant], variant


@pytest.mark.parametrize("variant,case", [(v, c) for v in run.VARIANTS for c in CASES[v]],
                         ids=[f"{v}-{c}" for v in run.VARIANTS for c in CASES[v]])
def test_integs_case(trees: dict, variant: str, case: str) -> None:
    suite, name = case.split(".", 1)
    exe = SUITE_EXECUTABLE[suite]
    result = run.run_case(run.Case(exe, suite, name), variant, trees["works"][variant],
                          run.EXECUTABLES[exe], trees["isolation"], trees["logs"])
    expected = EXPECTED_FAILURES.get((variant, case)) if _is_indibroker(trees["server"]) else None
    if expected is None:
        assert result.status == "PASS", (
            f"{variant} {case}: {result.status}: {result.first_failure}\n\n{result.output_tail}")
    elif result.status == "PASS":
        pytest.fail(f"{variant} {case} passes now: remove it from EXPECTED_FAILURES (to shrink)")
    else:
        pytest.xfail(f"{result.status}: {result.first_failure} | missing: {'; '.join(expected)}")
