"""The one watchdog (gateway/watchdog.py): each loop is judged by what it reported — idle is never
wedged, busy is wedged past its limit without progress, waiting on the far end only past its own
declared deadline; a loop counted by a counter makes progress when the counter moves."""

from __future__ import annotations

from gateway.watchdog import Loop, Watchdog, describe
from test_ingest import publisher, running, until, write_config


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_idle_is_never_wedged_busy_is_past_its_limit_without_progress() -> None:
    clock = Clock()
    dog = Watchdog(margin=1.0, clock=clock)
    loop = dog.loop("forward[x]", limit=10.0)
    clock.t += 10_000
    assert dog.wedged() == []  # idle for hours: fine
    loop.busy()
    clock.t += 10.5
    assert dog.wedged() == []  # within limit + margin
    clock.t += 1.0
    [state] = dog.wedged()
    assert state.name == "forward[x]" and state.state == "busy" and 0 < state.wedged_for <= 0.6
    assert "no progress for 12 s" in describe(state)
    loop.progress()
    assert dog.wedged() == []  # it moved
    loop.busy()  # still busy: busy again does not restart the clock
    clock.t += 11.5
    assert [s.name for s in dog.wedged()] == ["forward[x]"]


def test_waiting_on_the_far_end_is_judged_by_the_loops_own_deadline() -> None:
    clock = Clock()
    dog = Watchdog(margin=1.0, clock=clock)
    loop = dog.loop("forward[broker]", limit=10.0)
    loop.busy()
    loop.waiting("receipts from sluice ingest", until=clock.t + 300.0)  # far beyond the busy limit
    clock.t += 299.0
    [state] = dog.states()
    assert state.wedged_for is None and state.state == "waiting" and state.until_in == 1.0
    assert describe(state) == "waiting on receipts from sluice ingest, acting again within 1 s"
    clock.t += 1.5
    assert dog.wedged() == []  # past the deadline but within the margin
    clock.t += 1.0
    [state] = dog.wedged()  # it declared it would act and did not
    assert "past its own deadline" in describe(state)
    loop.waiting("receipts from sluice ingest", until=clock.t + 60.0)  # it re-sent and waits again
    assert dog.wedged() == []
    loop.waiting("the sink's connection", None)  # no deadline: its supervisor reconnects
    clock.t += 10_000
    assert dog.wedged() == []


def test_a_counted_loop_is_busy_and_progresses_when_its_counter_moves() -> None:
    clock = Clock()
    dog = Watchdog(margin=0.0, clock=clock)
    polls = [0]
    dog.loop("poll[a]", limit=5.0, counter=lambda: polls[0])
    clock.t += 4.0
    polls[0] += 1
    assert dog.wedged() == []  # sampled at each judgement (every ping)
    clock.t += 5.0
    assert dog.wedged() == []
    clock.t += 0.5
    assert [s.name for s in dog.wedged()] == ["poll[a]"]
    dog.remove("poll[a]")
    assert dog.wedged() == [] and dog.names() == []


def test_a_loop_made_without_a_watchdog_is_a_harmless_handle() -> None:
    loop = Loop("alone")
    loop.busy()
    loop.progress()
    loop.waiting("x", None)
    loop.idle()
    assert loop.judge(0.0).state == "idle"


async def test_the_ingest_waiting_out_the_database_reports_it_and_is_not_wedged(tmp_path, mosquitto,
                                                                                close_default_executor) -> None:
    """``sluice ingest`` with messages waiting and no database: its write loop reports waiting on the
    database until its next retry (the sink's backoff), so the shared watchdog never calls it wedged."""

    cfg = write_config(tmp_path / "ingest.yaml", mosquitto, {"url": "http://127.0.0.1:1", "api": "v1", "database": "x"})
    async with running(cfg) as ingest, publisher(mosquitto) as pub:
        ingest.watchdog.margin = 1.0  # the event loop may run a retry a little after its time
        await pub.publish("sluice/lab/gw/dev", b"m v=1i 1760000000000000000", qos=1)
        seen = []

        def waiting_on_the_database() -> bool:
            states = {s.name: s for s in ingest.watchdog.states()}
            seen.append(states["write[ingest]"])
            return states["write[ingest]"].on == "the database at http://127.0.0.1:1" and ingest.stats.retries >= 5

        await until(waiting_on_the_database, 30, "waiting on the database")
        assert ingest.pending == 0 and ingest.stats.acked == 0  # held, unacknowledged, while it waits
        assert not [s for s in seen if s.wedged_for is not None], seen
        assert all(s.until_in is None or s.until_in <= 0.3 for s in seen if s.state == "waiting")  # retry_max
