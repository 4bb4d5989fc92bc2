"""A whole run on a simulated spot fleet (issue 40): the real driver's bookkeeping (lease, plan, guard, store,
markers, manifest, stall watch, summary) on a virtual clock; only the clock, the executor and the engine are
stand-ins. Days of a run in seconds here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import veclip_cli

from veclip.shards.driver import RayExecutor, run_stage
from veclip.shards.layout import CURRENT
from veclip.shards.simulate import SimConfig, SimPool, SimStage, simulate
from veclip.shards.store import ShardStore
from veclip.shards.worker import FaultConfig
from veclip.storage import Location

FLEET = (SimPool("captioner", 12, 6.7, 5.0), SimPool("fuser", 4, 1.3, 5.0))


def test_two_thousand_shards_on_sixteen_spot_actors_finish_with_every_shard_once(tmp_path):
    """10% of nodes preempted an hour, replaced in 10 minutes, engines loading for 5: days of virtual time, every
    shard marked once or recorded failed (three tries lost to preemptions), no stop of the healthy run."""
    config = SimConfig(shards=2000, pools=FLEET, preemption_per_hour=0.10, seed=1)
    result = simulate(config, str(tmp_path / "out"))
    assert result.finished and result.stopped is None and result.lease_lapses == 0, result.render()
    store = ShardStore(Location(str(tmp_path / "out")))
    markers, failed = store.markers(), store.failures()
    assert len(markers) == result.shards_done and set(markers).isdisjoint(failed)
    assert result.shards_done + result.shards_failed == 2000
    assert all(m.rows_out == 10_000 for m in markers.values())
    summary = json.loads((tmp_path / "out" / CURRENT.summary).read_text())
    assert summary["shards"]["done"] == result.shards_done and summary["rows_in"] == 10_000 * result.shards_done
    assert result.preemptions > 0 and result.tries_lost > 0 and summary["shards"]["retried"] > 0
    work = 2000 * 6.7 / 60 / 12  # hours of captioning on 12 actors, the longer pool
    assert work < result.hours < 1.5 * work and 0.5 < result.goodput < 1.0


def test_s3_faults_and_killed_actors_are_absorbed_by_the_real_retries(tmp_path):
    """Every store request takes 30 ms and one in 200 fails after the client's retries; actors are killed on live
    nodes besides the preemptions. The real code absorbs it: the marker reads at the summary retry what failed
    (before, one reset among them ended the run), a killed actor's try is charged and redone."""
    config = SimConfig(
        shards=300,
        pools=(SimPool("captioner", 8, 6.0), SimPool("fuser", 2, 1.3)),
        actor_kills_per_hour=0.2,
        s3_latency_ms=30,
        s3_fault_rate=0.005,
        seed=2,
    )
    result = simulate(config, str(tmp_path / "out"))
    assert result.finished and result.crashed is None and result.lease_lapses == 0, result.render()
    assert result.s3_faults > 0 and result.actor_kills > 0 and result.s3_requests > 3000
    store = ShardStore(Location(str(tmp_path / "out")))
    assert len(store.markers()) + len(store.failures()) == 300 == result.shards_done + result.shards_failed


def test_a_plan_becomes_its_simulated_run_at_both_ends_of_its_rates():
    """``veclip plan --simulate``: the rewrite's pools at max_actors; "both" runs LaCLIP on the fuser's engines;
    a shard's minutes are its rows times requests per row over the rate, at the fast and the slow end."""
    from veclip.plan import simulated_runs
    from veclip.rewrite.config import preset
    from veclip.shards.simulate import Fleet

    config = preset("default")
    per_row = {"captioner": 1.0, "fuser": 1.0, "laclip": 4.0}
    rates = {"captioner": (15.0, 40.0), "fuser": (100.0, 150.0), "laclip": (100.0, 150.0)}
    plan = {
        "rows_total": 3_000_000,
        "shards_total": 300,
        "prices": {"H100": 4.0},
        "pools": [
            {"role": r, "per_row": {"requests": n}, "rates": {"H100": rates[r]}, "source": "[estimate]"}
            for r, n in per_row.items()
        ],
    }
    fleet = Fleet(preemption_per_hour=0.05)
    (fast_label, fast), (slow_label, slow) = simulated_runs(plan, config, "H100", 5.0, fleet)
    assert fast_label.startswith("fast end") and slow_label.startswith("slow end")
    captioner, fuser = fast.pools
    assert (captioner.name, captioner.actors) == ("captioner", config.captioner.pool.max_actors)
    assert captioner.shard_minutes == pytest.approx(10_000 / 40 / 60)
    assert fuser.name == "fuser" and fuser.shard_minutes == pytest.approx(10_000 / 150 / 60 + 4 * 10_000 / 150 / 60)
    assert slow.pools[0].shard_minutes == pytest.approx(10_000 / 15 / 60)
    assert fast.shards == 300 and fast.rows_per_shard == 10_000 and fast.preemption_per_hour == 0.05
    with pytest.raises(ValueError, match="no rate on L40S"):
        simulated_runs(plan, config, "L40S", 5.0, fleet)


def test_a_pool_with_nothing_placed_after_preemptions_is_stopped_with_the_drivers_own_line(tmp_path):
    config = SimConfig(
        shards=200, pools=(SimPool("laclip", 4, 5.0, 5.0),), preemption_per_hour=2.0, never_replaced=True
    )
    result = simulate(config, str(tmp_path / "out"))
    assert not result.finished
    assert result.stopped.startswith("simulate: stopped: no actor of the pool is working and nothing progressed for")
    assert "faults.first_shard_seconds = 3600 s" in result.stopped and "rerun to continue" in result.stopped
    plan = json.loads((tmp_path / "out" / CURRENT.plan).read_text())
    assert plan["stopped"]["why"] == result.stopped  # recorded as the real driver records it
    assert not (tmp_path / "out" / CURRENT.lease).exists()


@pytest.mark.slow
def test_the_simulated_executor_conforms_to_ray_datas(tmp_path, ray_session):
    """One small stage (two pools, a shard that always fails) through Ray Data's actor pools and through the
    simulated fleet: the same markers, output shards, summary counts and failure records."""
    config = SimConfig(
        shards=6,
        rows_per_shard=50,
        pools=(SimPool("first", 2, 1.0, 0.5), SimPool("last", 2, 1.0, 0.5)),
        preemption_per_hour=0.0,
        poison=("part-000004.parquet",),
        faults=FaultConfig(backoff_seconds=0.01),
    )
    ray_out, sim_out = tmp_path / "ray", tmp_path / "sim"
    ray_summary = run_stage(SimStage(config, str(ray_out)), lambda *_: None, executor=RayExecutor())
    simulate(config, str(sim_out))
    sim_summary = json.loads((sim_out / CURRENT.summary).read_text())

    def outcome(out: Path, summary: dict) -> dict:
        store = ShardStore(Location(str(out)))
        return {
            "markers": {n: (m.rows_out, m.quarantined, m.fingerprint, m.input) for n, m in store.markers().items()},
            "shards": sorted(p.name for p in out.glob("*.parquet")),
            "failures": {n: (f.stage, f.tries, f.errors) for n, f in store.failures().items()},
            "counts": {k: summary["shards"][k] for k in ("total", "done", "written_this_run", "failed", "redone")},
            "rows": (summary["rows_in"], summary["rows_out"], summary["rows_in_failed_shards"]),
        }

    assert outcome(ray_out, ray_summary) == outcome(sim_out, sim_summary)
    assert outcome(sim_out, sim_summary)["failures"]["part-000004.parquet"][1] == 3


def test_veclip_simulate_prints_the_distribution_labelled_as_simulated():
    result = veclip_cli(
        "simulate", "--shards", "60", "--pool", "captioner:4:6:5", "--pool", "fuser:2:1", "--seeds", "2"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SIMULATED (not measured) over 2 seed(s): 60 shards" in result.stdout
    for line in ("finish", "GPU-hours", "goodput", "cost", "redone", "stops       0 of 2"):
        assert line in result.stdout, result.stdout
    assert "] 60/60 shards" in result.stdout  # the progress bar's last state


def test_a_bad_pool_is_refused_with_its_form():
    result = veclip_cli("simulate", "--pool", "captioner:many:6")
    assert result.returncode == 2 and "NAME:ACTORS:SHARD_MINUTES" in result.stderr, result.stderr


@pytest.mark.parametrize("node_gone, outcome", [(True, "done"), (False, "failed")])
def test_tries_lost_with_their_node_do_not_use_up_the_shards_tries(tmp_path, node_gone, outcome):
    """Four tries lost in a row: with their nodes preempted the shard is no cause and its fifth try runs; with
    the nodes alive (the process itself killed, an OOM) the shard has had its three tries and is recorded."""
    from veclip.shards.guard import RunContext, ShardGuard

    guard = ShardGuard(Location(str(tmp_path)), RunContext("r1", "f"), "simulate", 3, 0.0)
    guard.where = lambda: {"node": "spot-1", "actor": "a1"}
    guard.node_alive = lambda node: not node_gone
    for _ in range(4):
        guard._begin("part-0.parquet")  # a try begun, then lost with its process
    assert guard.run_shard("part-0.parquet", "in/part-0.parquet", lambda: None) == outcome


def test_a_shard_done_after_a_retry_is_not_taken_for_a_death_when_tried_again(tmp_path):
    """A shard done on its second try keeps its try record (the summary counts it retried). A later try of it in
    the same run (Ray re-running a batch whose actor died after the commit) read that record as a try that died
    with its process and charged it: found by a simulated run in which a shard failed on "three deaths" after
    one actor kill."""
    from veclip.shards.guard import RunContext, ShardGuard

    guard = ShardGuard(Location(str(tmp_path)), RunContext("r1", "f"), "simulate", 3, 0.0)
    guard.where = lambda: {"node": "n1", "actor": "a1"}
    flaky = iter([RuntimeError("a reset"), None])

    def work():
        if error := next(flaky):
            raise error

    assert guard.run_shard("part-0.parquet", "in/part-0.parquet", work) == "done"
    assert guard.run_shard("part-0.parquet", "in/part-0.parquet", lambda: None) == "done"
    record = json.loads((tmp_path / CURRENT.attempts / "simulate" / "part-0.parquet.json").read_text())
    assert record["tries"] == 2 and record["lost"] == [], record  # the run again counts no try at all


def test_veclip_plan_simulate_prints_the_plan_then_its_simulated_run(tmp_path, monkeypatch, capsys):
    """The command as a user types it: the plan's figures unchanged, then the projected run simulated at both
    ends of the estimated rates, each labelled with the rates it used."""
    from veclip import cli

    plan = {
        "input": "s3://b/in",
        "mode": "laclip",
        "rows_total": 40_000,
        "shards_total": 4,
        "sampled_rows": 64,
        "prices": {"H100": 4.0, "L40S": 1.9},
        "pools": [
            {
                "role": "laclip",
                "per_row": {"requests": 4.0, "prompt_tokens": 80.0, "generated_tokens": 40.0},
                "totals": {"requests": 160_000.0, "prompt_tokens": 3.2e6, "generated_tokens": 1.6e6},
                "rates": {"H100": (100.0, 150.0)},
                "source": "[estimate] docs/scaling.md",
                "gpu_hours": {"H100": (0.3, 0.44)},
            }
        ],
    }
    monkeypatch.setattr("veclip.plan.plan_rewrite", lambda *args, **kwargs: plan)
    args = ["plan", "--input", "s3://b/in", "--mode", "laclip", "--simulate", "--seeds", "1"]
    assert cli.main([*args, "--preemption-per-hour", "0.2", "--set", "laclip.pool.max_actors=2"]) == 0
    out = capsys.readouterr().out
    assert "plan: rewrite (mode laclip) of 40,000 rows in 4 shards" in out  # the plan, as without --simulate
    assert "plan --simulate: fast end of the rates: laclip 150 requests/s per H100" in out
    assert "plan --simulate: slow end of the rates: laclip 100 requests/s per H100" in out
    assert out.count("SIMULATED (not measured) over 1 seed(s): 4 shards of 10,000 rows; laclip 2 x") == 2
    assert "preemption 20%/h per node" in out and "$4.00/GPU-h" in out
