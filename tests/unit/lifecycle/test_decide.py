"""The reconciler's choice as a table: a document, the demand, the clocks and the config in,
one action out. No threads, no store, no sleeps."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone

import pytest

from proxy.config import Config
from proxy.lifecycle.decide import (
    HEALTH_EVERY,
    PROBE_EVERY,
    AckDown,
    Bake,
    CheckHealth,
    Clock,
    Demand,
    DropBake,
    Memory,
    Provision,
    ResumeAwaitReady,
    ResumeBake,
    ResumeBringUp,
    ResumeRemoval,
    Retire,
    RetryTearDown,
    SetAside,
    TearDownIdle,
    Wait,
    decide,
    live_inflight,
)
from proxy.lifecycle.schedule import parse_windows
from proxy.lifecycle.state import Phase, State
from proxy.store.base import WorkerReport

NOW = datetime(2026, 6, 3, 12, 0, tzinfo=timezone.utc).timestamp()  # a Wednesday, noon UTC
MONO = 5000.0
CONFIG = Config(idle_timeout=600, drain_timeout=300)
HOUR = 3600.0
# Ready for an hour; its instance asked for an hour ago.
READY = {"phase": "ready", "ready_since": NOW - HOUR, "instance_since": NOW - HOUR}
READY_STATE = State.from_doc(READY)
SEEN = Memory(last_health=MONO - 1)  # probed a second ago: no health probe due


NOBODY = Demand()


def choose(doc, demand=NOBODY, *, config=CONFIG, memory=SEEN, now=NOW, mono=MONO):
    """The action for a document as the store holds it (JSON)."""
    return decide(State.from_doc(doc), demand, Clock(now, mono), config, memory)[0]


def with_(**changes) -> Config:
    return dataclasses.replace(CONFIG, **changes)


WARM_NOW = parse_windows("mon-sun 11:00-13:00")  # NOW is inside it
SPENT = {"gpu_days": {"2026-06-03": 3 * HOUR}}  # three GPU hours used today (UTC)

TABLE = [
    # (why, document, demand, config, expected action)
    ("idle, nobody asks", {"phase": "idle"}, Demand(), CONFIG, Wait()),
    ("idle, a request wants the GPU", {"phase": "idle"}, Demand(wanted_at=NOW - 1), CONFIG,
     Provision()),
    ("idle, only demand already answered", {"phase": "idle", "demand_cutoff": NOW - 1},
     Demand(wanted_at=NOW - 2), CONFIG, Wait()),
    ("idle, budget used up, new demand set aside", {"phase": "idle", **SPENT},
     Demand(wanted_at=NOW - 1), with_(daily_gpu_hours=2), SetAside(NOW - 1)),
    ("idle, budget used up, nothing new", {"phase": "idle", "demand_cutoff": NOW, **SPENT},
     Demand(wanted_at=NOW - 1), with_(daily_gpu_hours=2), Wait()),
    ("idle, budget left", {"phase": "idle", **SPENT}, Demand(wanted_at=NOW - 1),
     with_(daily_gpu_hours=4), Provision()),
    ("idle inside a warm window", {"phase": "idle"}, Demand(), with_(warm_windows=WARM_NOW),
     Provision()),
    ("idle, warm window switched off by a down", {"phase": "idle", "warm_off_until": NOW + 60},
     Demand(), with_(warm_windows=WARM_NOW), Wait()),
    ("idle with PROXY_MIN_SERVERS: kept up without demand", {"phase": "idle"}, Demand(),
     with_(min_servers=1, max_servers=2), Provision()),
    ("idle, an operator's down", {"phase": "idle"}, Demand(down_at=NOW - 1), CONFIG,
     AckDown(NOW - 1)),
    ("idle, that down already handled", {"phase": "idle", "down_handled": NOW - 1},
     Demand(down_at=NOW - 1), CONFIG, Wait()),
    ("error, before its retry time", {"phase": "error", "retry_at": NOW + 5},
     Demand(wanted_at=NOW), CONFIG, Wait()),
    ("error, retry time passed, demand since", {"phase": "error", "retry_at": NOW - 1,
                                                "phase_since": NOW - 30},
     Demand(wanted_at=NOW - 2), CONFIG, Provision()),
    ("error, retry time passed, no demand since", {"phase": "error", "retry_at": NOW - 1,
                                                   "phase_since": NOW - 30},
     Demand(wanted_at=NOW - 40), CONFIG, Wait()),
    ("error, failed removal, no demand", {"phase": "error", "retry_at": NOW - 1,
                                          "phase_since": NOW - 30, "teardown_pending": True},
     Demand(), CONFIG, RetryTearDown()),
    ("error, demand but budget used up", {"phase": "error", "retry_at": NOW - 1,
                                          "phase_since": NOW - 30, **SPENT},
     Demand(wanted_at=NOW - 2), with_(daily_gpu_hours=2), Wait()),
    ("idle, an operator's bake: a server to bake from", {"phase": "idle"},
     Demand(bake_at=NOW - 1), CONFIG, Provision()),
    ("idle, that bake already handled", {"phase": "idle", "bake_handled": NOW - 1},
     Demand(bake_at=NOW - 1), CONFIG, Wait()),
    ("ready, an operator's bake", READY, Demand(bake_at=NOW - 1, bake_models=True), CONFIG,
     Bake(NOW - 1, True)),
    ("ready, a bake before the idle removal", READY,
     Demand(bake_at=NOW - 1, last_activity=NOW - 900), CONFIG, Bake(NOW - 1, False)),
    ("ready, a down wins over a bake", READY, Demand(down_at=NOW - 1, bake_at=NOW - 1), CONFIG,
     Retire("an operator asked for it (ollama-exoscale down)", NOW - 1, False)),
    ("baking: no bring-up, no idle removal, the bake goes on", {"phase": "baking"},
     Demand(wanted_at=NOW - 1, last_activity=NOW - 900), CONFIG, ResumeBake()),
    ("error, a bake asked for: dropped with the failure",
     {"phase": "error", "retry_at": NOW + 5, "last_error": "quota"}, Demand(bake_at=NOW - 1),
     CONFIG, DropBake(NOW - 1, "no GPU server to bake from: quota")),
    ("provisioning, interrupted", {"phase": "provisioning"}, Demand(), CONFIG, ResumeBringUp()),
    ("starting, interrupted", {"phase": "starting"}, Demand(), CONFIG, ResumeAwaitReady()),
    ("destroying, interrupted", {"phase": "destroying", "phase_since": NOW - 10}, Demand(),
     CONFIG, ResumeRemoval(NOW - 10 + 300)),
    ("ready, in use", READY, Demand(inflight=2, last_activity=NOW - 900), CONFIG, Wait()),
    ("ready, idle for less than the timeout", READY, Demand(last_activity=NOW - 500), CONFIG,
     Wait()),
    ("ready, idle for the timeout", READY, Demand(last_activity=NOW - 600), CONFIG,
     TearDownIdle(NOW - 600, 600.0)),
    ("ready, idle but a request in flight", READY, Demand(inflight=1,
                                                          last_activity=NOW - 900),
     CONFIG, Wait()),
    ("ready, idle inside a warm window", READY, Demand(last_activity=NOW - 900),
     with_(warm_windows=WARM_NOW), Wait()),
    ("ready, idle with PROXY_MIN_SERVERS", READY, Demand(last_activity=NOW - 900),
     with_(min_servers=1, max_servers=2), Wait()),
    ("ready, idle while a fleet server still runs",
     {**READY, "servers": {"gpu-1": {"phase": "destroying"}}}, Demand(last_activity=NOW - 900),
     with_(max_servers=2), Wait()),
    ("ready, idle, the fleet's other server stopped",
     {**READY, "servers": {"gpu-1": {"phase": "idle", "instance_status": "stopped"}}},
     Demand(last_activity=NOW - 600), with_(max_servers=2), TearDownIdle(NOW - 600, 600.0)),
    ("ready, an operator's down under demand", READY, Demand(inflight=3, down_at=NOW - 1),
     CONFIG, Retire("an operator asked for it (ollama-exoscale down)", NOW - 1, False)),
    ("ready, down with idle action stop", READY, Demand(down_at=NOW - 1),
     with_(idle_action="stop"),
     Retire("an operator asked for it (ollama-exoscale down)", NOW - 1, True)),
    ("ready, budget used up", {**READY, **SPENT}, Demand(inflight=1),
     with_(daily_gpu_hours=0.5), Retire("the daily GPU budget of 0.5 h is used up", 0.0, False)),
    ("ready, past its instance-hour cap: a fresh one, never a stop", READY, Demand(inflight=1),
     with_(max_instance_hours=1, idle_action="stop"),
     Retire("it has run for PROXY_MAX_INSTANCE_HOURS=1 h", 0.0, False)),
    ("ready, under its instance-hour cap", READY, Demand(inflight=1),
     with_(max_instance_hours=2), Wait()),
]


@pytest.mark.parametrize("why,doc,demand,config,expected", TABLE, ids=[row[0] for row in TABLE])
def test_the_action_for_each_situation(why, doc, demand, config, expected):
    assert choose(doc, demand, config=config) == expected


def test_phases_are_the_strings_stored_documents_hold():
    assert State.from_doc({"phase": "provisioning"}).phase is Phase.PROVISIONING
    assert Phase.READY == "ready" and f"{Phase.READY}" == "ready"


def test_a_ready_server_is_probed_every_health_interval_and_after_a_failure_sooner():
    due = Memory(last_health=MONO - HEALTH_EVERY)
    action, memory = decide(READY_STATE, Demand(last_activity=NOW), Clock(NOW, MONO), CONFIG, due)
    assert action == CheckHealth()
    assert memory.last_health == MONO and memory.health_wish == NOW
    # Just probed: nothing due.
    assert decide(READY_STATE, Demand(last_activity=NOW), Clock(NOW, MONO + 1), CONFIG,
                  memory)[0] == Wait()
    # After a failed probe, the next comes PROBE_EVERY later.
    failing = dataclasses.replace(memory, health_failures=1)
    assert decide(READY_STATE, Demand(last_activity=NOW), Clock(NOW, MONO + PROBE_EVERY), CONFIG,
                  failing)[0] == CheckHealth()


def test_a_request_that_found_the_upstream_failing_has_it_probed_at_once():
    memory = Memory(last_health=MONO - 1, health_wish=NOW - 10)
    wish = Demand(last_activity=NOW, wanted_at=NOW - 5)  # a worker's wish after the last probe
    action, memory = decide(READY_STATE, wish, Clock(NOW, MONO), CONFIG, memory)
    assert action == CheckHealth()
    # Answered: the same wish does not probe again.
    assert decide(READY_STATE, wish, Clock(NOW, MONO + 1), CONFIG, memory)[0] == Wait()


def test_idle_time_also_counts_on_the_monotonic_clock_when_the_wall_clock_steps_back():
    demand = Demand(last_activity=NOW - 100)
    action, memory = decide(READY_STATE, demand, Clock(NOW, MONO), CONFIG, SEEN)
    assert action == Wait()
    assert memory.idle_mark == (NOW - 100, MONO)
    # The wall clock is stepped back an hour; 600 s pass on the monotonic clock.
    stepped = dataclasses.replace(memory, last_health=MONO + 599)
    action, _ = decide(READY_STATE, demand, Clock(NOW - HOUR + 600, MONO + 600), CONFIG, stepped)
    assert action == TearDownIdle(NOW - 100, 600.0)


def test_the_idle_mark_moves_with_new_activity():
    _, memory = decide(READY_STATE, Demand(last_activity=NOW - 100), Clock(NOW, MONO), CONFIG, SEEN)
    _, memory = decide(READY_STATE, Demand(last_activity=NOW - 1), Clock(NOW, MONO + 50), CONFIG,
                       memory)
    assert memory.idle_mark == (NOW - 1, MONO + 50)


def test_dead_workers_stop_counting_in_flight():
    reports = [
        WorkerReport("a", 2, NOW - 5, 0.0, NOW - 1, 0.0),
        WorkerReport("b", 3, NOW - 5, 0.0, NOW - 30, 0.0),  # silent for 30 s: dead
    ]
    assert live_inflight(reports, NOW) == 2
    assert Demand.of(reports, NOW) == Demand(inflight=2, last_activity=NOW - 5)
