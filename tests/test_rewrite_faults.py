"""Resume, fault isolation, fingerprints, the lease and planning, without an engine:
real storage (local disk and the local S3 server, through a fault-injecting
proxy), the real shard workers and guard, and a scripted engine where a test
needs an engine to fail on cue."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import MemoryPeak, noise_jpegs, veclip_cli
from s3_faults import Fault, FaultProxy

from veclip.rewrite.config import FaultConfig, fingerprint, preset
from veclip.rewrite.engine import Completion
from veclip.rewrite.stage import EngineUnavailable, Rewrite, check_engine_python, list_inputs, plan_run
from veclip.rewrite.workers import ShardRewriter
from veclip.shards.driver import record_plan, shard_rows
from veclip.shards.guard import DONE, FAILED, RunContext, ShardGuard, running_on
from veclip.shards.layout import CURRENT
from veclip.shards.lease import OutputLease
from veclip.shards.marker import Marker
from veclip.shards.plan import FingerprintMismatch
from veclip.shards.store import ShardStore
from veclip.shards.summary import summarize
from veclip.storage import Location, StorageOptions, read_footers, read_many


class ScriptedEngine:
    """Answers every request with a fixed caption; raises on rows that carry ``poison``."""

    name = "scripted"

    def __init__(self, poison: str = "POISON", fail_first: int = 0):
        self.poison, self.fail_first, self.calls = poison, fail_first, 0

    def generate(self, requests, sampling):
        self.calls += 1
        if self.calls <= self.fail_first:
            raise ConnectionResetError("engine connection reset")
        if any(self.poison in (r.prompt or "") for r in requests):
            raise ValueError("scripted engine refuses this batch")
        return [Completion("a red star on a striped wall", 5, 6) for _ in requests]


def laclip_config(source, output, **faults) -> "RewriteConfig":  # noqa: F821
    base = preset("default")
    return dataclasses.replace(
        base,
        input=str(source),
        output=str(output),
        mode="laclip",
        faults=FaultConfig(**{"backoff_seconds": 0.01, **faults}),
    )


def _laclip_cli(source, output, *flags: str, timeout: int = 300):
    """`veclip rewrite --mode laclip` with the default preset, as a user types it."""
    cmd = ["rewrite", "--preset", "default", "--mode", "laclip", "--input", str(source), "--output", str(output)]
    return veclip_cli(*cmd, *flags, timeout=timeout)


def put_tree(local, url, options):
    Location(url, options).fs.put(str(local) + "/", url[len("s3://") :], recursive=True)


def run_local(config, options=None, engine=None, run_id="r1", redo_mismatched=False):
    """The driver's plan, the workers' loop and the summary, in-process (no Ray)."""
    options = options or StorageOptions()
    run = RunContext(run_id, fingerprint(config)[0])
    lease = OutputLease(Location(config.output, options), run_id)
    lease.acquire()
    try:
        plan = plan_run(config, options, run.fingerprint, redo_mismatched)
        worker = ShardRewriter(config, options, run, engine=engine or ScriptedEngine())
        statuses = worker(shard_rows(plan))["status"]
        stage = Rewrite(config, options, redo_mismatched)
        record_plan(stage, plan, run, time.time())
        return plan, statuses, summarize(stage, plan, run, 1.0)
    finally:
        lease.release()


def test_listings_are_fresh_when_another_process_writes(s3_bucket, tmp_path):
    """The resume bug: s3fs caches a listing per process; markers written by actors must still be seen."""
    url, options = s3_bucket
    store = ShardStore(Location(url + "/out", options))
    store.write(Marker("a.parquet", 0), pa.table({"key": ["x"]}))
    assert store.done() == {"a.parquet"}
    store.location.fs.ls(store.location.join(CURRENT.done))  # warm s3fs's cache, as the driver's planning does
    code = (
        "import pyarrow as pa, sys; from veclip.storage import *; from veclip.shards.store import ShardStore; "
        "from veclip.shards.marker import Marker; "
        f"ShardStore(Location('{url}/out', StorageOptions(endpoint_url='{options.endpoint_url}', key='testing', "
        "secret='testing')))"
        ".write(Marker('b.parquet', 0), pa.table({'key': ['y']}))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert store.done() == {"a.parquet", "b.parquet"}
    assert set(store.markers()) == {"a.parquet", "b.parquet"}
    assert store.find_marker("b.parquet") is not None


def test_marker_manifest_reads_only_what_is_new(tmp_path, monkeypatch):
    store = ShardStore(Location(str(tmp_path)))
    for k in range(5):
        store.write(Marker(f"s{k}.parquet", 0, rows_in=1), pa.table({"key": [str(k)]}))
    fetched = []
    real = read_many

    def counting(fs, paths):
        fetched.extend(paths)
        return real(fs, paths)

    monkeypatch.setattr("veclip.shards.store.read_many", counting)
    assert len(store.markers(save_manifest=True)) == 5 and len(fetched) == 5
    fetched.clear()
    assert len(store.markers()) == 5 and fetched == []  # all from the manifest
    time.sleep(0.01)
    store.write(Marker("s1.parquet", 0, rows_in=2), pa.table({"key": ["1", "again"]}))  # a shard redone
    store.write(Marker("s9.parquet", 0), pa.table({"key": ["9"]}))
    markers = store.markers(save_manifest=True)
    assert sorted(p.rsplit("/", 1)[1] for p in fetched) == ["s1.parquet.json", "s9.parquet.json"]
    assert markers["s1.parquet"].rows == 2 and len(markers) == 6
    (tmp_path / CURRENT.done / "s0.parquet.json").unlink()  # a marker removed by hand: its shard is not done
    assert "s0.parquet" not in store.markers()


def poisoned_copy(train, source, row: int, alt_text: str) -> tuple[object, list[dict]]:
    """A copy of the sample's train shards in ``source`` whose part-00001 row ``row`` has ``alt_text``:
    (that shard's path, its rows)."""
    source.mkdir()
    for p in sorted(train.glob("*.parquet")):
        (source / p.name).write_bytes(p.read_bytes())
    poisoned = source / "part-00001.parquet"
    rows = pq.read_table(poisoned).to_pylist()
    rows[row]["alt_text"] = alt_text
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(poisoned)), poisoned)
    return poisoned, rows


def test_poison_shard_is_recorded_and_the_rest_finish(sample_root, tmp_path):
    source = tmp_path / "in"
    poisoned, rows = poisoned_copy(sample_root / "train", source, 3, "POISON row")
    config = laclip_config(source, tmp_path / "out")
    engine = ScriptedEngine()
    plan, statuses, summary = run_local(config, engine=engine)
    assert statuses == [DONE, FAILED, DONE]
    assert summary["shards"] == {
        "total": 3,
        "done": 2,
        "written_this_run": 2,
        "failed": 1,
        "redone": 0,
        "left_out": {},
        "retried": 0,
        "actors_lost": 0,
        "nodes_lost": 0,
    }
    failed = summary["failed"]["part-00001.parquet"]
    assert failed["stage"] == "rewrite" and failed["tries"] == 3 and "refuses this batch" in failed["error"]
    record = ShardStore(Location(config.output)).failures()["part-00001.parquet"]
    assert len(record.errors) == 3 and record.input.endswith("part-00001.parquet")

    # the poison is removed; a rerun retries exactly the failed shard, and the record goes
    rows[3]["alt_text"] = "a fine caption"
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(poisoned)), poisoned)
    plan, statuses, summary = run_local(config, run_id="r2")
    assert [s.name for s in plan.todo] == ["part-00001.parquet"] and statuses == [DONE]
    assert summary["failed"] == {} and summary["shards"]["done"] == 3
    assert summary["rows_out"] + summary["rows_quarantined"] == 60 == summary["rows_in"]


def test_transient_errors_are_retried(sample_root, tmp_path):
    config = laclip_config(sample_root / "train", tmp_path / "out")
    plan, statuses, summary = run_local(config, engine=ScriptedEngine(fail_first=2))
    assert statuses == [DONE] * 3 and summary["failed"] == {}
    # told, not hidden: the shard retried, its lost tries' errors, in the summary and its printout
    assert summary["shards"]["retried"] == 1 and summary["retried"]["part-00000.parquet"]["tries"] == 3
    assert "connection reset" in summary["retried"]["part-00000.parquet"]["errors"][-1]
    from veclip.rewrite.stage import render_summary

    assert "retried 1 shard(s) whose earlier try was lost or failed" in render_summary(summary)
    attempts = tmp_path / "out" / CURRENT.attempts / "rewrite"
    assert not (attempts / "part-00001.parquet.json").exists()  # a first try that worked leaves nothing
    _, _, rerun = run_local(config, run_id="r2")
    assert rerun["shards"]["retried"] == 0 and rerun["retried"] == {}  # another run's retries are its own


def test_a_shard_whose_tries_kill_the_process_is_recorded(tmp_path):
    """Tries that died with their process leave only their durable count; past the limit the shard fails."""
    out = Location(str(tmp_path))
    guard = ShardGuard(out, RunContext("run-a", "fp"), "rewrite", max_attempts=2, backoff_seconds=0)
    for _ in range(2):  # two tries that "crashed": counted, never finished
        guard._begin("x.parquet")
    ran = []
    assert guard.run_shard("x.parquet", "in/x.parquet", lambda: ran.append(1)) == FAILED and ran == []
    record = ShardStore(out).failures()["x.parquet"]
    assert record.tries == 2 and "process died" in record.error
    # a new run starts its own count
    fresh = ShardGuard(out, RunContext("run-b", "fp"), "rewrite", max_attempts=2, backoff_seconds=0)
    assert fresh.run_shard("x.parquet", "in/x.parquet", lambda: ran.append(1)) == DONE and ran == [1]


def test_tries_lost_with_their_process_are_told_apart_from_errors(tmp_path):
    """A try that died with its process (no error recorded) is kept as lost, with where it ran; a try that
    raised is not: the summary counts the actors lost."""
    out = Location(str(tmp_path))
    guard = ShardGuard(out, RunContext("run-a", "fp"), "rewrite", max_attempts=4, backoff_seconds=0)
    guard._begin("x.parquet")  # a try that "crashed"
    errors = iter([OSError("connection reset")])

    def work():
        if error := next(errors, None):
            raise error

    assert guard.run_shard("x.parquet", "in/x.parquet", work) == DONE
    [(name, record)] = ShardStore(out).retried("rewrite", "run-a").items()
    assert record["tries"] == 3 and len(record["errors"]) == 1
    assert record["lost"] == [running_on()]  # the crash (where it ran: here), not the error


def test_planning_records_unreadable_shards_and_fails_fast_on_bad_schema(sample_root, tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    for p in sorted((sample_root / "train").glob("*.parquet")):
        (source / p.name).write_bytes(p.read_bytes())
    whole = (source / "part-00002.parquet").read_bytes()
    (source / "part-00002.parquet").write_bytes(whole[: len(whole) // 2])  # truncated upload
    config = laclip_config(source, tmp_path / "out")
    plan, statuses, summary = run_local(config)
    assert [s.name for s in plan.todo] == ["part-00000.parquet", "part-00001.parquet"]
    assert "truncated" in plan.unreadable["part-00002.parquet"] or "Parquet" in plan.unreadable["part-00002.parquet"]
    assert summary["failed"]["part-00002.parquet"]["stage"] == "plan" and summary["shards"]["done"] == 2

    bad = dataclasses.replace(
        config, output=str(tmp_path / "out2"), columns=type(config.columns).parse("image=alt_text")
    )
    with pytest.raises(ValueError, match="no input shard fits the column mapping"):
        plan_run(bad, None, fingerprint(bad)[0])


def _shards_and_markers_on_s3(sample_root, tmp_path, url: str, options, n: int) -> None:
    """``n`` input shards of 3 rows under ``url/in`` and ``n`` done markers under ``url/out``."""
    local = tmp_path / "in"
    local.mkdir()
    table = pq.read_table(sorted((sample_root / "train").glob("*.parquet"))[0])
    for k in range(n):
        pq.write_table(table.slice(k, 3), local / f"part-{k:05d}.parquet")
    put_tree(local, url + "/in", options)
    store = ShardStore(Location(url + "/out", options))
    for k in range(n):
        store.write(Marker(f"m{k}.parquet", 0), pa.table({"key": [str(k)]}))


def test_driver_reads_footers_and_markers_concurrently(sample_root, s3_endpoint, s3_bucket, tmp_path):
    """Planning and the summary overlap their requests (a bucket's latency is paid once per
    batch, not once per shard): seen as requests in flight together at a slow endpoint."""
    url, options = s3_bucket
    _shards_and_markers_on_s3(sample_root, tmp_path, url, options, 12)
    proxy = FaultProxy(s3_endpoint).start()
    try:
        proxy.delay = 0.05
        slow = dataclasses.replace(options, endpoint_url=proxy.url)
        location = Location(url + "/in", slow)
        shards = list(list_inputs(location).values())
        footers = read_footers(location.fs, [(s.path, s.size) for s in shards])
        assert [f.num_rows for f in footers.values()] == [3] * 12
        assert proxy.max_in_flight >= 6, proxy.max_in_flight
        proxy.max_in_flight = 0
        assert len(ShardStore(Location(url + "/out", slow)).markers()) == 12
        assert proxy.max_in_flight >= 6, proxy.max_in_flight
    finally:
        proxy.stop()


def test_footer_and_marker_reads_that_fail_past_s3fs_retries_are_tried_again(
    sample_root, s3_bucket, s3_endpoint, tmp_path
):
    """A 500 on a shard's footer read that outlives s3fs's own retries used to leave the shard out of a
    training plan (its fingerprint changed, the resume moved to the next epoch); on a marker read it ended
    the summary. Both are tried again."""
    url, options = s3_bucket
    _shards_and_markers_on_s3(sample_root, tmp_path, url, options, 4)
    proxy = FaultProxy(s3_endpoint).start()
    try:
        flaky = dataclasses.replace(options, endpoint_url=proxy.url)
        proxy.faults = [
            Fault(r"in/part-00001\.parquet", 500, methods=("GET",), times=6),  # s3fs tries 5 times
            Fault(r"done/m2\.parquet\.json", 500, methods=("GET",), times=6),
        ]
        location = Location(url + "/in", flaky)
        footers = read_footers(location.fs, [(s.path, s.size) for s in list_inputs(location).values()])
        assert [f.num_rows for f in footers.values()] == [3] * 4, footers
        assert len(ShardStore(Location(url + "/out", flaky)).markers()) == 4
        assert len(proxy.injected) == 12  # each outlived s3fs's own five tries once
    finally:
        proxy.stop()


def test_fingerprint_mismatch_stops_and_redo_rewrites(sample_root, tmp_path):
    config = laclip_config(sample_root / "train", tmp_path / "out")
    run_local(config)
    assert (
        fingerprint(
            dataclasses.replace(
                config,
                laclip=dataclasses.replace(config.laclip, pool=dataclasses.replace(config.laclip.pool, max_actors=64)),
            )
        )[0]
        == fingerprint(config)[0]
    )
    hotter = dataclasses.replace(
        config,
        laclip=dataclasses.replace(
            config.laclip, sampling=dataclasses.replace(config.laclip.sampling, temperature=0.3)
        ),
    )
    digest = fingerprint(hotter)[0]
    assert digest != fingerprint(config)[0]
    with pytest.raises(FingerprintMismatch, match="--redo-mismatched"):
        plan_run(hotter, None, digest)
    plan, statuses, summary = run_local(hotter, run_id="r9", redo_mismatched=True)
    assert len(plan.redo) == 3 and len(plan.todo) == 3 and plan.done == {} and statuses == [DONE] * 3
    assert summary["shards"]["redone"] == 3 and summary["fingerprint"] == digest
    markers = ShardStore(Location(config.output)).markers()
    assert {m.fingerprint for m in markers.values()} == {digest}


def test_transient_s3_faults_lose_nothing(sample_root, s3_endpoint, s3_bucket, tmp_path):
    """503 SlowDown, 500s and dropped connections on a share of all requests: the run finishes whole."""
    url, options = s3_bucket
    put_tree(sample_root / "train", url + "/in", options)
    proxy = FaultProxy(s3_endpoint).start()
    try:
        proxy.faults = [
            Fault(r"/", 503, probability=0.15),
            Fault(r"/", 500, probability=0.05),
            Fault(r"/", "reset", probability=0.05),
        ]
        faulty = dataclasses.replace(options, endpoint_url=proxy.url)
        config = laclip_config(url + "/in", url + "/out")
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        plan, statuses, summary = run_local(config, faulty)
        assert len(proxy.injected) > 5, proxy.injected
        assert statuses == [DONE] * 3 and summary["failed"] == {}
        assert summary["rows_out"] + summary["rows_quarantined"] == 60
    finally:
        proxy.stop()


def test_persistent_s3_failure_is_recorded_then_retried(sample_root, s3_endpoint, s3_bucket, tmp_path):
    url, options = s3_bucket
    put_tree(sample_root / "train", url + "/in", options)
    proxy = FaultProxy(s3_endpoint).start()
    try:
        proxy.faults = [Fault(r"/out/part-00001\.parquet$", 403, methods=("PUT",))]  # a prefix the writer may not write
        faulty = dataclasses.replace(options, endpoint_url=proxy.url)
        config = laclip_config(url + "/in", url + "/out")
        plan, statuses, summary = run_local(config, faulty)
        assert statuses == [DONE, FAILED, DONE]
        assert summary["failed"]["part-00001.parquet"]["error"] == "PermissionError: Access Denied"
        proxy.faults = []
        plan, statuses, summary = run_local(config, faulty, run_id="r2")
        assert [s.name for s in plan.todo] == ["part-00001.parquet"] and statuses == [DONE]
        assert summary["failed"] == {} and summary["shards"]["done"] == 3
    finally:
        proxy.stop()


def test_engine_python_is_found_from_any_folder(tmp_path, vllm_python):
    env = {k: v for k, v in os.environ.items() if k != "VECLIP_VLLM_PYTHON"}
    code = "from veclip.rewrite.config import default_vllm_python; print(default_vllm_python())"
    found = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, check=True
    )
    assert os.path.realpath(found.stdout.strip()) == os.path.realpath(vllm_python)


def test_a_pool_python_without_vllm_fails_before_any_pool_starts(sample_root, tmp_path):
    config = laclip_config(sample_root / "train", tmp_path / "out")
    config = dataclasses.replace(
        config,
        laclip=dataclasses.replace(config.laclip, pool=dataclasses.replace(config.laclip.pool, python=sys.executable)),
    )
    with pytest.raises(EngineUnavailable, match="cannot import vllm.*make env"):
        check_engine_python(config)
    result = veclip_cli(
        "rewrite",
        "--preset",
        "tiny",
        "--mode",
        "laclip",
        "--input",
        str(sample_root / "train"),
        "--output",
        str(tmp_path / "o"),
        "--set",
        f"laclip.pool.python={tmp_path}/nope/python",
        timeout=120,
    )
    assert result.returncode != 0 and "does not exist" in result.stderr


def test_an_input_replaced_after_its_output_was_written_is_reported_and_the_rest_planned(sample_root, tmp_path):
    """One re-uploaded input shard among many: reported (recorded failed, the run exits non-zero), its old output
    kept as it was, every other shard planned and written; it never stops the whole run."""
    source = tmp_path / "in"
    source.mkdir()
    for p in sorted((sample_root / "train").glob("*.parquet")):
        (source / p.name).write_bytes(p.read_bytes())
    config = laclip_config(source, tmp_path / "out")
    run_local(config)
    table = pq.read_table(source / "part-00001.parquet")
    pq.write_table(table.slice(0, 5), source / "part-00001.parquet")  # a different shard under the same name
    (tmp_path / "out" / "part-00002.parquet").unlink()  # and another's output lost: redone
    plan, statuses, summary = run_local(config, run_id="r2")
    assert "changed after its output was written" in plan.unreadable["part-00001.parquet"]
    assert [s.name for s in plan.todo] == ["part-00002.parquet"] and plan.redo == ["part-00002.parquet"]
    assert statuses == [DONE] and "part-00001.parquet" in summary["failed"]
    assert (tmp_path / "out" / "part-00002.parquet").exists()


def test_a_marker_whose_shard_file_is_gone_is_redone(sample_root, tmp_path):
    """Readers trusted markers: an output shard deleted (a lifecycle rule, a manual rm) stayed marked, the rerun
    redid nothing and training read fewer rows. The planner cross-checks the shards listed against the markers."""
    config = laclip_config(sample_root / "train", tmp_path / "out")
    run_local(config)
    (tmp_path / "out" / "part-00000.parquet").unlink()
    dry = _laclip_cli(sample_root / "train", tmp_path / "out", "--dry-run")
    assert "1 to do" in dry.stdout and "1 of them to redo" in dry.stdout, dry.stdout + dry.stderr
    assert (tmp_path / "out" / CURRENT.done / "part-00000.parquet.json").exists()  # a dry run drops nothing
    plan, statuses, summary = run_local(config, run_id="r2")
    assert [s.name for s in plan.todo] == ["part-00000.parquet"] and statuses == [DONE]
    assert summary["shards"]["done"] == 3 and summary["shards"]["redone"] == 1
    assert (tmp_path / "out" / "part-00000.parquet").exists()


def test_cli_exits_non_zero_listing_failed_shards(sample_root, tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    for p in sorted((sample_root / "train").glob("*.parquet")):
        (source / p.name).write_bytes(p.read_bytes())
    (source / "part-00003.parquet").write_bytes(b"PAR1 an upload cut short")
    config = laclip_config(source, tmp_path / "out")
    run_local(config)  # the three good shards are done; the cut one is recorded
    result = _laclip_cli(source, tmp_path / "out", timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "FAILED: 1 shard(s) kept failing" in result.stdout and "part-00003.parquet  [plan, 1 tries]" in result.stdout
    assert "3 already done, 0 to do, 1 unreadable" in result.stdout


def test_engine_secrets_never_reach_the_summary_or_records(sample_root, tmp_path):
    token = "hf_s3cr3tT0kenValue"
    config = laclip_config(sample_root / "train", tmp_path / "out")
    engine_env = {"HF_TOKEN": token, "VLLM_CPU_KVCACHE_SPACE": "1"}
    config = dataclasses.replace(
        config,
        laclip=dataclasses.replace(config.laclip, engine=dataclasses.replace(config.laclip.engine, env=engine_env)),
    )
    leaky = ScriptedEngine()
    leaky.generate = lambda requests, sampling: (_ for _ in ()).throw(ValueError(f"401 for token {token}"))
    plan, statuses, summary = run_local(config, engine=leaky)  # every shard fails, quoting the token
    assert set(statuses) == {FAILED}
    text = json.dumps(summary)
    assert token not in text
    assert summary["config"]["laclip"]["engine"]["env"] == {"HF_TOKEN": "<redacted>", "VLLM_CPU_KVCACHE_SPACE": "1"}
    assert summary["failed"]["part-00000.parquet"]["error"] == "ValueError: 401 for token <redacted>"
    assert (
        summary["fingerprint_fields"]["laclip"]["sampling"]["max_tokens"] == 77
    )  # names like *_tokens are not secrets
    records = list((tmp_path / "out").rglob("*.json"))
    assert len(records) >= 6 and not [r for r in records if token in r.read_text()]
    from veclip.rewrite.stage import _remote_args

    env_vars = _remote_args(config.laclip.pool, config.laclip)["runtime_env"]["env_vars"]
    assert env_vars == {
        "VLLM_CPU_KVCACHE_SPACE": "1"
    }  # Ray shows runtime_envs: the token goes only to the engine's process


def test_a_shard_with_duplicate_or_null_keys_is_refused_not_retried_and_names_the_rows(sample_root, tmp_path):
    """Captions are joined by key: a duplicate key once swapped captions between its rows. The shard is
    recorded as failed at once, with the rows named, and the others are written."""
    source = tmp_path / "in"
    shutil.copytree(sample_root / "train", source)
    bad = source / "part-00001.parquet"
    table = pq.read_table(bad)
    keys = table.column("key").to_pylist()
    keys[5], keys[7] = keys[2], None
    pq.write_table(table.set_column(table.schema.get_field_index("key"), "key", pa.array(keys, pa.string())), bad)
    engine = ScriptedEngine()
    plan, statuses, summary = run_local(laclip_config(source, tmp_path / "out"), engine=engine)
    assert statuses == [DONE, FAILED, DONE]
    failed = summary["failed"]["part-00001.parquet"]
    assert failed["tries"] == 1 and "ShardRefused" in failed["error"]
    assert "1 null key(s) at rows [7]" in failed["error"] and f"{keys[2]!r} at rows 2 and 5" in failed["error"]


def test_a_one_row_group_shard_is_rewritten_a_batch_at_a_time(tmp_path, monkeypatch):
    """Shards in one row group (as pyarrow writes them by default): the worker checks, rewrites and
    writes the enriched shard holding a batch of images at a time, so memory does not grow with rows."""
    from veclip import parquet_files

    monkeypatch.setattr(
        parquet_files, "ROW_GROUP_TARGET_BYTES", 1_000_000
    )  # the writer's buffer (128 MiB in production)
    images, held, sizes = noise_jpegs(200, side=128), {}, {}
    for n in (2_000, 8_000):
        keys = [f"k{i:05d}" for i in range(n)]
        table = pa.table(
            {
                "key": keys,
                "image": [images[i % 200] for i in range(n)],
                "alt_text": [f"photo {i} of a star" for i in range(n)],
            }
        )
        source, output = tmp_path / f"in-{n}", tmp_path / f"out-{n}"
        source.mkdir()
        pq.write_table(table, source / "part-00000.parquet", use_dictionary=["key", "alt_text"])
        config = dataclasses.replace(laclip_config(source, output), layout="copy")  # the images are written too
        with MemoryPeak() as peak:
            assert run_local(config)[1] == [DONE]
        held[n], sizes[n] = peak.grew, (source / "part-00000.parquet").stat().st_size
        out = pq.ParquetFile(output / "part-00000.parquet")
        assert out.read(columns=["key"]).column("key").to_pylist() == keys and out.num_row_groups > 1
    # 6,000 more rows: ~120 MB more images, a few MB more text (keys, AltText, captions: held whole by design)
    assert held[8_000] - held[2_000] < (sizes[8_000] - sizes[2_000]) / 4, (held, sizes)


def test_refused_images_are_found_and_quarantined_in_one_pass_over_the_shard(train_copy, tmp_path, monkeypatch):
    """LaCLIP checks each image's header and limits and quarantines the refused rows, images and all: one
    read of the ~1 GB shard does both (the images were read a second time for the quarantine)."""
    from veclip.rewrite import workers

    first = sorted(train_copy.glob("*.parquet"))[0]
    table = pq.read_table(first)
    images = pa.array([b"junk"] + table.column("image").to_pylist()[1:], pa.binary())
    pq.write_table(table.set_column(table.schema.get_field_index("image"), "image", images), first)
    reads, real = [], workers.read_batches
    monkeypatch.setattr(
        workers, "read_batches", lambda fs, path, *a, **k: reads.append(path) or real(fs, path, *a, **k)
    )
    _, statuses, _ = run_local(laclip_config(train_copy, tmp_path / "out"))
    assert set(statuses) == {DONE} and sorted(reads) == sorted(str(p) for p in train_copy.glob("*.parquet"))
    quarantine = pq.read_table(tmp_path / "out" / CURRENT.quarantine / first.name)
    assert quarantine.column("key").to_pylist() == [table.column("key")[0].as_py()]
    assert quarantine.column("image").to_pylist() == [b"junk"] and quarantine.column("reason")[0].as_py()


def test_bookkeeping_that_keeps_failing_never_aborts_the_shards_work(tmp_path, monkeypatch, capsys):
    """The try count's writes failing past s3fs's own retries (a long S3 brown-out) are retried, then said and
    passed over: the shard is still written and marked; before, one such error aborted the whole Ray Data job."""
    from veclip.shards import guard as guard_module

    calls = []

    def failing(*args, **kwargs):
        calls.append(args[1])
        raise OSError("SlowDown: please reduce your request rate")

    monkeypatch.setattr(guard_module, "write_json", failing)
    guard = ShardGuard(Location(str(tmp_path)), RunContext("r1", "f"), "rewrite", 3, 0.001)
    written = []
    assert guard.run_shard("part-0.parquet", "in/part-0.parquet", lambda: written.append(1)) == DONE
    assert written == [1] and len(calls) == guard_module.BOOKKEEPING_TRIES
    assert "could not count part-0.parquet's try" in capsys.readouterr().out
