#!/usr/bin/env python3
"""Run indilib 1.9.9's own server integration tests (integs/, gtest) against a chosen server.

    python3 tests/integs/run.py --server PATH [--variant plain|shm|both] [--cases PATTERN]
                                [--json FILE] [--logs DIR] [--timeout S] [--isolation auto|netns|none]

The tests are built by tests/integs/build.sh into $INTEGS_DIR (default /var/cache/indibroker-integs).
They start the server as ``../indiserver/indiserver`` and the tools as ``../tools/...``, relative
to their working directory, and find ``fakedriver`` in it. Each run gets its own copy of that
layout (symlinks to the built binaries, and ``indiserver/indiserver``: a wrapper that execs
``--server`` with the same arguments), so the shared build is never written and two runs never
clash on it.

Each case runs alone (``--gtest_filter=Suite.Case``), one after the other, with upstream's ctest
timeout (5 s; 10 s for TestIndiSetProperties). With ``--isolation netns`` (the default when
``unshare`` works, i.e. as root) every case gets new network, PID and mount namespaces
(``unshare -npmf --mount-proc`` with ``lo`` up): port 17624 and the tests' abstract unix sockets
(``/tmp/indi-test-server``, ``/tmp/fakedriver-test``) are private to it, ``/proc`` shows its own
PIDs (the tests count the server's descriptors in ``/proc/<pid>/fd``), and when the case ends or
times out everything it started dies with the namespace (a server that forks workers into new
sessions included). Each case also gets a fresh ``XDG_RUNTIME_DIR``.

One line per case: PASS / FAIL / TIMEOUT / ERROR and the first failure line, then a summary.
Exit status 0 when every selected case passed.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_BUILD = os.environ.get("INTEGS_DIR", "/var/cache/indibroker-integs")
VARIANTS = ("plain", "shm")
# Test executables, in upstream's order, with upstream's ctest TIMEOUT (integs/CMakeLists.txt).
EXECUTABLES = {
    "XmlAwaiterTest": 5.0,
    "TestIndiserverSingleDriver": 5.0,
    "TestClientQueries": 5.0,
    "TestIndiSetProp": 10.0,
    "TestIndiClient": 5.0,
}
# Cases that never start a server (they test the tests' XML matcher, and libindiclient against a
# mock server): they pass or fail whatever --server is.
SERVERLESS_SUITES = {"XmlAwaiter", "IndiclientTcpConnect"}
TEST_PORT = 17624
OUTPUT_KEEP = 6000  # characters of a case's output kept in the JSON (the whole is in its log)


@dataclass
class Case:
    executable: str
    suite: str
    name: str

    @property
    def id(self) -> str:
        return f"{self.suite}.{self.name}"


@dataclass
class Result:
    variant: str
    id: str
    executable: str
    status: str  # PASS, FAIL, TIMEOUT, ERROR
    seconds: float
    serverless: bool
    first_failure: str = ""
    failure: str = ""
    returncode: int | None = None
    log: str = ""
    output_tail: str = field(default="", repr=False)


def resolve_server(server: str) -> str:
    found = shutil.which(server) if os.sep not in server else server
    if not found or not os.access(found, os.X_OK):
        sys.exit(f"run.py: server {server!r} not found or not executable")
    # Not realpath: a pyenv shim or a console script dispatches on its own name.
    return os.path.abspath(found)


def check_build(build: Path, variant: str) -> Path:
    integs = build / variant / "integs"
    missing = [e for e in ("fakedriver", *EXECUTABLES) if not os.access(integs / e, os.X_OK)]
    if missing:
        sys.exit(f"run.py: {integs} lacks {', '.join(missing)}: run tests/integs/build.sh first "
                 f"(INTEGS_DIR={build})")
    return integs


def make_tree(root: Path, integs: Path, server: str) -> Path:
    """The tests' layout, for one variant and one server; returns the working directory."""
    work = root / "integs"
    work.mkdir(parents=True)
    for entry in integs.iterdir():
        if entry.is_file() and os.access(entry, os.X_OK):
            (work / entry.name).symlink_to(entry)
    (root / "indiserver").mkdir()
    wrapper = root / "indiserver" / "indiserver"
    # run.py line-buffers the tests' stdout with stdbuf (LD_PRELOAD), so that a case killed at its
    # timeout still shows how far it got; the server must not inherit that.
    wrapper.write_text("#!/bin/sh\n"
                       'if [ -n "${INTEGS_STDBUF:-}" ]; then\n'
                       '    unset _STDBUF_O INTEGS_STDBUF\n'
                       '    if [ -n "${INTEGS_LD_PRELOAD:-}" ]; then export LD_PRELOAD="$INTEGS_LD_PRELOAD"; '
                       'else unset LD_PRELOAD; fi\n'
                       '    unset INTEGS_LD_PRELOAD\n'
                       'fi\n'
                       f'exec {shlex.quote(server)} "$@"\n')
    wrapper.chmod(0o755)
    (root / "tools").mkdir()
    setprop = integs.parent / "tools" / "indi_setprop"
    target = setprop if setprop.exists() else shutil.which("indi_setprop")
    if target:
        (root / "tools" / "indi_setprop").symlink_to(os.path.realpath(target))
    return work


def list_cases(work: Path) -> list[Case]:
    cases: list[Case] = []
    for exe in EXECUTABLES:
        out = subprocess.run([str(work / exe), "--gtest_list_tests"], cwd=work, capture_output=True,
                             text=True, timeout=30, check=True).stdout
        suite = None
        for line in out.splitlines():
            if line.startswith("  ") and suite:
                cases.append(Case(exe, suite, line.split("#")[0].strip()))
            elif line.rstrip().endswith(".") and not line.startswith("Running main()"):
                suite = line.strip()[:-1]
    return cases


def select(cases: list[Case], pattern: str | None) -> list[Case]:
    """PATTERN: comma-separated globs on Suite.Case (or the executable's name); '-glob' excludes."""
    if not pattern:
        return cases
    globs = [g.strip() for g in pattern.split(",") if g.strip()]
    inc = [g for g in globs if not g.startswith("-")]
    exc = [g[1:] for g in globs if g.startswith("-")]

    def hit(c: Case, gs: list[str]) -> bool:
        return any(fnmatch.fnmatchcase(c.id, g) or fnmatch.fnmatchcase(c.executable, g) for g in gs)

    return [c for c in cases if (not inc or hit(c, inc)) and not hit(c, exc)]


def netns_works() -> bool:
    if not shutil.which("unshare") or not shutil.which("ip"):
        return False
    try:
        return subprocess.run(_ns_prefix() + ["true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _ns_prefix() -> list[str]:
    # sh stays PID 1 of the namespace (reaps orphans); when it exits, or unshare is killed
    # (--kill-child), the kernel kills everything left in the namespace.
    return ["unshare", "--net", "--pid", "--mount", "--fork", "--kill-child", "--mount-proc", "--",
            "sh", "-c", 'ip link set lo up || exit 97; "$@"; exit $?', "sh"]


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _port_free(port: int) -> bool:
    import socket
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


FAIL_RE = re.compile(r"(?P<where>unknown file|[^\s:]+:\d+): Failure$")
GTEST_MARK = re.compile(r"^\[ *(FAILED|OK|RUN|PASSED) *\]")
TIMESTAMPED = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")
SERVER_LOG = re.compile(r"^(\d{4}-\d\d-\d\dT|<|\s)")  # indiserver / indibroker log lines, XML dumps


def one_line(text: str, limit: int = 400) -> str:
    text = " \\n ".join(ln.strip() for ln in text.strip().splitlines() if ln.strip())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def parse_failure(output: str) -> tuple[str, str]:
    """(first failure, on one line; the whole failure block) from gtest's output."""
    lines = output.splitlines()
    for i, line in enumerate(lines):
        m = FAIL_RE.search(line.rstrip())
        if not m:
            continue
        block = []
        for nxt in lines[i + 1:]:
            if GTEST_MARK.match(nxt):
                break
            if TIMESTAMPED.match(nxt):  # the server's log, interleaved on the same stderr
                continue
            block.append(nxt)
            if nxt.rstrip().endswith("thrown in the test body."):
                break
        text = "\n".join(block).strip()
        text = re.sub(r'^C\+\+ exception with description "', "", text)
        text = re.sub(r'" thrown in the test body\.$', "", text)
        where = m.group("where")
        first = one_line(text) if where == "unknown file" else one_line(f"{where}: {text}")
        return first, "\n".join(block).strip()
    return "", ""


SYSCALLS = {0: "read", 7: "poll", 23: "select", 35: "nanosleep", 42: "connect", 43: "accept",
            46: "sendmsg", 47: "recvmsg", 61: "wait4", 202: "futex", 230: "clock_nanosleep",
            232: "epoll_wait", 288: "accept4"}
WAITING_FOR = {"wait4": "the server to exit", "read": "input", "recvmsg": "input",
               "accept": "a connection (the fake driver, or a client)", "accept4": "a connection",
               "connect": "a connection to be accepted"}


def blocked_in(root: int, executable: str) -> str:
    """What the test process is blocked in (x86-64 Linux), to tell where a case that timed out hung."""
    for pid in [root, *_descendants(root)]:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv0 = f.read().split(b"\0")[0].decode(errors="replace")
            if not argv0.endswith("/" + executable):
                continue
            with open(f"/proc/{pid}/syscall") as f:
                fields = f.read().split()
        except OSError:
            continue
        if not fields or not fields[0].lstrip("-").isdigit():
            return fields[0] if fields else ""
        name = SYSCALLS.get(int(fields[0]), f"syscall {fields[0]}")
        why = WAITING_FOR.get(name)
        return f"blocked in {name}()" + (f", waiting for {why}" if why else "")
    return ""


def last_step(output: str) -> str:
    """The test's last progress line (its own stderr, not the server's log)."""
    steps = [ln.strip() for ln in output.splitlines()
             if ln.strip() and not SERVER_LOG.match(ln) and not GTEST_MARK.match(ln)]
    return steps[-1] if steps else ""


_SUBREAPER = False


def _become_subreaper() -> None:
    """Without namespaces, make orphans (a server whose test died) our children, to find and end them."""
    global _SUBREAPER
    if not _SUBREAPER:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        _SUBREAPER = libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER


def _kill_and_reap(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in pids:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass  # not our child (reaped by its own parent)


def run_case(case: Case, variant: str, work: Path, timeout: float, isolation: str,
             logdir: Path) -> Result:
    serverless = case.suite in SERVERLESS_SUITES
    cmd = [str(work / case.executable), f"--gtest_filter={case.id}", "--gtest_color=no"]
    env = dict(os.environ, GTEST_COLOR="no")
    if shutil.which("stdbuf"):
        cmd = ["stdbuf", "-oL", *cmd]
        env["INTEGS_STDBUF"] = "1"
        if "LD_PRELOAD" in env:
            env["INTEGS_LD_PRELOAD"] = env["LD_PRELOAD"]
    before: set[int] = set()
    if isolation == "netns":
        cmd = _ns_prefix() + cmd
    else:
        _become_subreaper()
        before = set(_descendants(os.getpid()))
        deadline = time.monotonic() + 3
        while not _port_free(TEST_PORT) and time.monotonic() < deadline:
            time.sleep(0.1)
    rundir = tempfile.mkdtemp(prefix="integs-xdg-")  # short: indibroker puts sockets under it
    env["XDG_RUNTIME_DIR"] = rundir
    log = logdir / f"{variant}.{case.id}.log"
    t0 = time.monotonic()
    timed_out, where = False, ""
    # Output to a file, not a pipe: a server left running must not hold the reader until it exits.
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            where = blocked_in(proc.pid, case.executable)
            # netns: unshare dies, --kill-child ends the namespace and all it holds
            _kill_and_reap([proc.pid, *_descendants(proc.pid)])
            proc.wait()
        seconds = time.monotonic() - t0
        if isolation != "netns":  # nothing else ends what the server left behind: do it here
            for _ in range(20):
                left = [p for p in _descendants(os.getpid()) if p not in before]
                if not left:
                    break
                _kill_and_reap(left)
                time.sleep(0.05)
    shutil.rmtree(rundir, ignore_errors=True)
    output = log.read_bytes().decode("utf-8", "replace")

    first, block = parse_failure(output)
    if timed_out:
        status = "TIMEOUT"
        first = first or (f"no result in {timeout:g} s; test {where or 'state unknown'}; "
                          f"last test step: {last_step(output)!r}")
    elif proc.returncode == 97 and isolation == "netns":
        status, first = "ERROR", "could not bring lo up in the new network namespace"
    elif proc.returncode == 0 and "[  PASSED  ] 1 test." in output:
        status = "PASS"
    elif "0 tests from 0 test suites ran" in output:
        status, first = "ERROR", "the filter matched no test"
    else:
        status = "FAIL"
        if not first:
            sig = -proc.returncode if proc.returncode and proc.returncode < 0 else None
            first = (f"killed by signal {signal.Signals(sig).name}" if sig else
                     f"exit status {proc.returncode}; last test step: {last_step(output)!r}")
    return Result(variant=variant, id=case.id, executable=case.executable, status=status,
                  seconds=round(seconds, 3), serverless=serverless, first_failure=first,
                  failure=block, returncode=proc.returncode, log=str(log),
                  output_tail=output[-OUTPUT_KEEP:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", required=True, help="server executable (path or command name)")
    ap.add_argument("--variant", choices=("plain", "shm", "both"), default="both")
    ap.add_argument("--cases", help="comma-separated globs on Suite.Case or executable; -glob excludes")
    ap.add_argument("--json", help="write results to this file")
    ap.add_argument("--build-dir", default=DEFAULT_BUILD, help=f"build.sh's INTEGS_DIR ({DEFAULT_BUILD})")
    ap.add_argument("--timeout", type=float, help="per-case timeout in s (default: upstream's, 5 or 10)")
    ap.add_argument("--isolation", choices=("auto", "netns", "none"), default="auto")
    ap.add_argument("--logs", help="keep each case's output here (default: a temporary directory, removed)")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("-v", "--verbose", action="store_true", help="print the failure block of each failing case")
    args = ap.parse_args(argv)

    server = resolve_server(args.server)
    build = Path(args.build_dir)
    variants = VARIANTS if args.variant == "both" else (args.variant,)
    isolation = args.isolation
    if isolation == "auto":
        isolation = "netns" if netns_works() else "none"
    elif isolation == "netns" and not netns_works():
        sys.exit("run.py: unshare --net --pid --mount-proc does not work here (root needed)")

    tmp = Path(tempfile.mkdtemp(prefix="indi-integs-"))
    logroot = Path(args.logs) if args.logs else tmp / "logs"
    logroot.mkdir(parents=True, exist_ok=True)
    results: list[Result] = []
    report: dict = {"server": args.server, "server_path": server, "build_dir": str(build),
                    "isolation": isolation, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "variants": {}}
    print(f"server: {server}   build: {build}   isolation: {isolation}", flush=True)
    try:
        for variant in variants:
            work = make_tree(tmp / variant, check_build(build, variant), server)
            cases = select(list_cases(work), args.cases)
            if args.list:
                for c in cases:
                    print(f"{variant}  {c.id}")
                continue
            print(f"--- {variant}: {len(cases)} cases", flush=True)
            vres = []
            for case in cases:
                timeout = args.timeout or EXECUTABLES[case.executable]
                r = run_case(case, variant, work, timeout, isolation, logroot)
                vres.append(r)
                tag = " (no server)" if r.serverless else ""
                detail = f"  {r.first_failure}" if r.status != "PASS" else ""
                print(f"{r.status:<7} {variant:<5} {r.id}{tag} ({r.seconds:.2f} s){detail}", flush=True)
                if args.verbose and r.status != "PASS" and r.failure:
                    print("        " + r.failure.replace("\n", "\n        "), flush=True)
            results += vres
            counts = {s: sum(r.status == s for r in vres) for s in ("PASS", "FAIL", "TIMEOUT", "ERROR")}
            report["variants"][variant] = {"cases": [asdict(r) for r in vres], "counts": counts}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the run's layout (and the logs, unless --logs)
    if args.list:
        return 0

    print("=== summary")
    for variant, v in report["variants"].items():
        c = v["counts"]
        total = sum(c.values())
        print(f"{variant:<5} {c['PASS']}/{total} passed, {c['FAIL']} failed, {c['TIMEOUT']} timed out, "
              f"{c['ERROR']} errors")
    total = len(results)
    passed = sum(r.status == "PASS" for r in results)
    served = [r for r in results if not r.serverless]
    served_ok = sum(r.status == "PASS" for r in served)
    print(f"all   {passed}/{total} passed against {server} "
          f"({served_ok}/{len(served)} of the cases that start a server)")
    if args.logs:
        print(f"logs: {logroot}")
    if args.json:
        report["passed"], report["total"] = passed, total
        report["server_cases_passed"], report["server_cases"] = served_ok, len(served)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if passed == total else 1


if __name__ == "__main__":
    sys.exit(main())
