"""Pure tests of how engine events become the reason users see (environments/reconcile.py)."""

from __future__ import annotations

from environments.reconcile import Change, EngineEventTracker, MEMORY_SECONDS, stop_reason
from environments.runtime import EngineEvent


def event(action: str, *, exit_code: int | None = None, signal: int | None = None, container: str = "c1") -> EngineEvent:
    return EngineEvent(action=action, container_id=container, environment_id="e1", exit_code=exit_code, signal=signal)


def test_docker_kill_is_killed() -> None:
    tracker = EngineEventTracker()
    assert tracker.interpret(event("kill", signal=9), now=10.0) is None
    assert tracker.interpret(event("die", exit_code=137), now=10.1) == Change("die", "killed")


def test_docker_stop_is_stopped_even_when_it_escalates_to_sigkill() -> None:
    tracker = EngineEventTracker()
    tracker.interpret(event("kill", signal=15), now=1.0)
    assert tracker.interpret(event("die", exit_code=143), now=1.2) == Change("die", "stopped")
    # `docker stop` whose SIGTERM was ignored: the SIGKILL that follows is the last signal, and it was a kill.
    tracker.interpret(event("kill", signal=15), now=2.0)
    tracker.interpret(event("kill", signal=9), now=12.0)
    assert tracker.interpret(event("die", exit_code=137), now=12.1) == Change("die", "killed")


def test_oom_wins_over_the_exit_code() -> None:
    tracker = EngineEventTracker()
    tracker.interpret(event("oom"), now=5.0)
    assert tracker.interpret(event("die", exit_code=137), now=5.05) == Change("die", "oom")


def test_a_plain_exit_says_its_code() -> None:
    assert EngineEventTracker().interpret(event("die", exit_code=3), now=0.0) == Change("die", "exited 3")
    assert stop_reason(None) == "stopped"


def test_old_signals_and_other_containers_do_not_leak_into_a_later_death() -> None:
    tracker = EngineEventTracker()
    tracker.interpret(event("oom", container="other"), now=0.0)
    tracker.interpret(event("kill", signal=9), now=0.0)
    assert tracker.interpret(event("die", exit_code=1), now=MEMORY_SECONDS + 1) == Change("die", "exited 1")
    assert tracker.interpret(event("die", exit_code=0, container="c2"), now=0.0) == Change("die", "exited 0")


def test_removal_forgets_what_it_remembered() -> None:
    tracker = EngineEventTracker()
    tracker.interpret(event("oom"), now=0.0)
    assert tracker.interpret(event("destroy"), now=0.1) == Change("destroy", "removed")
    assert tracker.oom == {} and tracker.signals == {}
    assert tracker.interpret(event("exec_start"), now=0.2) is None
