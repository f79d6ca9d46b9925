"""Lifecycle and restart policy, driven by a fake clock (plain floats)."""

from __future__ import annotations

from indibroker.broker.supervision import FlappingPolicy, Lifecycle, RestartPolicy, State


def crash_after(lc: Lifecycle, now: float, ran: float, how: str = "exit 1"):
    """Start (if due), run for `ran` seconds, crash; return (decision, time of the exit)."""
    lc.start()
    lc.spawned(now)
    return lc.exited(now + ran, how), now + ran


def test_backoff_grows_exponentially_and_is_capped():
    p = RestartPolicy(backoff_initial=1.0, backoff_factor=2.0, backoff_max=30.0)
    assert [p.delay(n) for n in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    lc, now, delays = Lifecycle(RestartPolicy(max_restarts=100, flap_max_exits=0)), 0.0, []
    for _ in range(8):
        decision, now = crash_after(lc, now, 0.5)
        assert decision.action == "restart" and lc.state is State.BACKOFF
        delays.append(decision.delay)
        now += decision.delay
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]
    assert lc.restarts == 8 and lc.attempts == 8


def test_backoff_cap_holds_for_any_attempt():
    assert RestartPolicy(max_restarts=5000).delay(1100) == 30.0


def test_stable_run_resets_attempts():
    lc, now = Lifecycle(RestartPolicy(max_restarts=3, stable_after=30.0, flap_max_exits=0)), 0.0
    for _ in range(3):
        decision, now = crash_after(lc, now, 1.0)
    assert lc.attempts == 3 and decision.delay == 4.0
    decision, now = crash_after(lc, now, 30.0)  # one stable run: the slate is clean
    assert decision.action == "restart" and decision.delay == 1.0 and lc.attempts == 1
    for _ in range(2):
        decision, now = crash_after(lc, now, 29.9)  # just short of stable: counted
    assert decision.action == "restart" and lc.attempts == 3


def test_consecutive_quick_failures_end_in_fatal():
    lc, now = Lifecycle(RestartPolicy(max_restarts=3, flap_max_exits=0)), 0.0
    actions = []
    for _ in range(4):
        decision, now = crash_after(lc, now, 0.1)
        actions.append(decision.action)
    assert actions == ["restart", "restart", "restart", "fatal"]
    assert lc.state is State.FATAL and "3 restart" in decision.reason
    assert lc.restarts == 3 and lc.last_exit == "exit 1"


def test_failure_to_spawn_counts_as_a_quick_failure():
    lc = Lifecycle(RestartPolicy(max_restarts=1))
    lc.start()
    assert lc.exited(5.0, "cannot start: not found").action == "restart"
    lc.start()
    assert lc.exited(6.0, "cannot start: not found").action == "fatal"


def test_max_restarts_zero_never_restarts():
    lc = Lifecycle(RestartPolicy(max_restarts=0))
    decision, _ = crash_after(lc, 0.0, 3600.0)  # even after a long, stable run
    assert decision.action == "fatal" and decision.reason and lc.state is State.FATAL
    assert lc.restarts == 0


def test_flapping_window():
    f = FlappingPolicy(max_exits=3, window=60.0)
    assert [f.record(t) for t in (0.0, 10.0, 20.0)] == [False, False, True]
    f.reset()
    assert [f.record(t) for t in (0.0, 40.0, 80.0, 120.0)] == [False, False, False, False]  # spread out
    assert FlappingPolicy(max_exits=0, window=60.0).record(0.0) is False  # 0 disables it


def test_flapping_catches_long_runs_that_keep_crashing():
    policy = RestartPolicy(max_restarts=100, stable_after=10.0, flap_max_exits=3, flap_window=100.0)
    lc, now = Lifecycle(policy), 0.0
    actions = []
    for _ in range(3):
        decision, now = crash_after(lc, now, 20.0)  # each run is "stable", so attempts stay at 0
        actions.append(decision.action)
        now += decision.delay
    assert actions == ["restart", "restart", "fatal"]
    assert "flapping" in decision.reason and lc.state is State.FATAL
    lc2, now = Lifecycle(policy), 0.0
    for _ in range(5):
        decision, now = crash_after(lc2, now, 60.0)  # 60 s apart: never 3 within 100 s
        assert decision.action == "restart"


def test_operator_stop_is_not_a_crash():
    lc = Lifecycle(RestartPolicy(max_restarts=5, flap_max_exits=2))
    lc.start()
    lc.spawned(0.0)
    assert lc.stop() is True and lc.state is State.STOPPING
    decision = lc.exited(0.5, "signal 15")
    assert decision.action == "stopped" and lc.state is State.STOPPED
    assert lc.attempts == 0 and lc.restarts == 0
    decision, _ = crash_after(lc, 1.0, 0.1)  # had the stop counted, this would be the 2nd flap: fatal
    assert decision.action == "restart" and lc.attempts == 1


def test_stop_when_not_running():
    lc = Lifecycle()
    assert lc.stop() is False and lc.state is State.STOPPED
    crash_after(lc, 0.0, 0.1)
    assert lc.state is State.BACKOFF
    assert lc.stop() is False and lc.state is State.STOPPED  # cancels the pending restart


def test_repeated_stop_is_still_a_stop():
    lc = Lifecycle()
    lc.start()
    lc.spawned(0.0)
    lc.stop()
    lc.stop()  # the operator asks again before the process has gone
    assert lc.exited(1.0, "signal 15").action == "stopped"
    assert lc.state is State.STOPPED


def test_start_from_fatal_forgives():
    lc, now = Lifecycle(RestartPolicy(max_restarts=2, flap_max_exits=3, flap_window=1000.0)), 0.0
    for _ in range(3):
        decision, now = crash_after(lc, now, 0.1)
    assert decision.action == "fatal"
    lc.start()
    assert lc.state is State.STARTING and lc.attempts == 0
    lc.spawned(now)
    decision = lc.exited(now + 0.1, "exit 1")  # neither attempts nor old flaps hold it back
    assert decision.action == "restart" and decision.delay == 1.0
