"""One shard's rewrite, step by step, with a stub engine: no vLLM, no Ray, no storage."""

import dataclasses
import io
import time

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from veclip import schema
from veclip.images import ImageError
from veclip.rewrite import steps
from veclip.rewrite.config import EngineConfig, preset
from veclip.rewrite.engine import Completion
from veclip.rewrite.prompts import CaptionerPrompt, FusionPrompt, LaClipPrompt
from veclip.shards.layout import CURRENT


class StubEngine:
    """Answers each request with ``answer(request)``; remembers what it was asked."""

    def __init__(self, name="stub", answer=lambda request: "a red star on a blue wall"):
        self.name, self.answer, self.requests = name, answer, []

    def generate(self, requests, sampling):
        self.requests += requests
        return [Completion(self.answer(r), 3, 5) for r in requests]


CONFIG = dataclasses.replace(preset("default"), input="in", output="out", seed=7)


def jpeg(color=(200, 30, 30), size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "JPEG")
    return buffer.getvalue()


def test_caption_describes_good_images_and_reports_bad_ones():
    engine, meter = StubEngine("vlm"), steps.Meter()
    images = [steps.decode_for_captioner(data, CONFIG) for data in (jpeg(), b"junk", jpeg(size=(2000, 1000)))]
    assert isinstance(images[1], ImageError) and max(images[2].size) == CONFIG.max_image_side
    rows = steps.caption(CONFIG, engine, CaptionerPrompt.load(CONFIG.captioner.prompts), ["a", "b", "c"], images, meter)
    assert [r["vlm_caption"] for r in rows] == ["a red star on a blue wall", None, "a red star on a blue wall"]
    assert rows[1]["image_error"] == images[1].reason and rows[0]["flags"] == []
    assert len(engine.requests) == 2 and all(
        r.image is not None and r.messages for r in engine.requests
    )  # chat, with the image
    assert [r.seed for r in engine.requests] == [steps.request_seed(7, "a"), steps.request_seed(7, "c")]
    assert meter.stats.requests == 2 and meter.stats.generated_tokens == 10


def test_split_quarantines_refused_rows_with_their_reason():
    table = pa.table({"key": ["a", "b", "c"], "image": [jpeg(), b"junk", None], "alt_text": ["x", "y", "z"]})
    errors = steps.header_errors(["a", "b", "c"], table.column("image").to_pylist(), CONFIG)
    kept, quarantine = steps.split(table, errors)
    assert kept.column("key").to_pylist() == ["a"] and sorted(quarantine.column("key").to_pylist()) == ["b", "c"]
    assert set(quarantine.column("reason").to_pylist()) == {errors["b"][0], errors["c"][0]}
    assert steps.split(table, {})[1].num_rows == 0  # nothing refused: an empty quarantine, same columns


def test_fuse_keeps_names_or_refuses_and_flags():
    answers = {"Acme mug": "a white mug on a table", "Paris trip": "a Paris street at dusk"}
    engine = StubEngine("llm", answer=lambda r: answers[next(k for k in answers if k in r.messages[-1]["content"])])
    alts, visual = ["Acme mug", "Paris trip", "anything"], ["a white mug", "a street", None]
    flags = steps.alt_text_flags(alts, CONFIG)
    vecaps = steps.fuse(
        CONFIG, engine, FusionPrompt.load(CONFIG.fuser.prompts), ["a", "b", "c"], alts, visual, flags, steps.Meter()
    )
    assert vecaps == [None, "a Paris street at dusk", None]
    assert flags == [["vecap:entities_lost"], [], ["vecap:no_visual_caption"]]  # "Acme" was dropped: refused
    assert len(engine.requests) == 2  # no request without a visual caption


def test_rewrite_makes_n_rewrites_per_row_with_exemplars():
    config = dataclasses.replace(CONFIG, num_rewrites=3, shots=2)
    engine = StubEngine("llm", answer=lambda r: "a photo of a small red star")
    alts = ["red star sticker", "", "blue circle"]
    flags = [[] for _ in alts]
    rewrites = steps.rewrite(
        config, engine, LaClipPrompt.load(config.laclip.prompts), ["a", "b", "c"], alts, flags, steps.Meter()
    )
    assert [len(r) for r in rewrites] == [3, 0, 3] and flags == [[], ["rewrites:empty_alt_text"], []]
    assert len(engine.requests) == 6 and len({r.seed for r in engine.requests}) == 6  # one seed per (key, rewrite)
    assert all(r.prompt.count("=>") >= 3 for r in engine.requests)  # 2 exemplars + the row itself


def test_assemble_writes_every_generated_column_with_provenance():
    table = pa.table({"key": ["a", "b"], "alt_text": ["x", "y"]})
    origin = steps.provenance("m", "laclip-v1", "vllm-x")
    out = steps.assemble(table, {schema.REWRITES: ([["r1"], []], origin)}, [["f"], []])
    assert out.column(schema.REWRITES).to_pylist() == [["r1"], []]
    assert out.column(schema.provenance_column(schema.REWRITES)).to_pylist() == [origin, origin]
    assert out.column(schema.VECAP).to_pylist() == [None, None]  # not made by this run: null, no provenance
    assert out.column(schema.provenance_column(schema.VECAP)).to_pylist() == [None, None]
    assert out.column(schema.REWRITE_FLAGS).to_pylist() == [["f"], []]


def test_both_mode_never_hides_a_second_engine_or_pool():
    both = dataclasses.replace(CONFIG, mode="both")
    both.validate_for_run()  # the presets share one LLM and one pool
    other_model = dataclasses.replace(
        both, laclip=dataclasses.replace(both.laclip, engine=dataclasses.replace(both.laclip.engine, model="other"))
    )
    with pytest.raises(ValueError, match=r"laclip.engine differs from fuser.engine in \['model'\]"):
        other_model.validate_for_run()
    bigger_pool = dataclasses.replace(
        both, laclip=dataclasses.replace(both.laclip, pool=dataclasses.replace(both.laclip.pool, max_actors=64))
    )
    with pytest.raises(ValueError, match=r"laclip.pool differs from fuser.pool in \['max_actors'\]"):
        bigger_pool.validate_for_run()


def test_both_mode_takes_the_fusers_pool_for_both_roles_as_the_readme_sets_it():
    """The README's and scaling guide's commands set fuser.pool.* only: in mode both that is the pool of both
    roles; setting laclip.pool.* to something else as well is still refused."""
    from veclip.rewrite.config import build_config

    overrides = ["captioner.pool.max_actors=16", "fuser.pool.max_actors=4", "laclip.sampling.temperature=0.9"]
    config = build_config("default", None, overrides, input="in", output="out", mode="both")
    config.validate_for_run()
    assert config.laclip.pool.max_actors == 4 and config.laclip.sampling.temperature == 0.9
    clash = build_config(
        "default", None, [*overrides, "laclip.pool.max_actors=6"], input="in", output="out", mode="both"
    )
    with pytest.raises(ValueError, match=r"laclip.pool differs from fuser.pool in \['max_actors'\]"):
        clash.validate_for_run()
    alone = build_config("default", None, ["fuser.pool.max_actors=4"], input="in", output="out", mode="laclip")
    assert alone.laclip.pool.max_actors != 4  # only mode both shares the pool


def _rewrite_in_process(tmp_path, url=None, options=None, output="out", mode="vecap", split="train", **fields):
    """A small sample (one image broken) rewritten through both actor classes in-process, stub engines;
    on local disk, or under ``url`` (with ``options``) on S3."""
    import pyarrow.parquet as pq

    from veclip.rewrite.config import fingerprint
    from veclip.rewrite.stage import Rewrite, plan_run
    from veclip.rewrite.workers import ShardCaptioner, ShardRewriter
    from veclip.shards.driver import record_plan, shard_rows
    from veclip.shards.guard import RunContext
    from veclip.shards.lease import OutputLease
    from veclip.shards.summary import summarize
    from veclip.storage import Location, StorageOptions
    from veclip.world.generate import SampleConfig, generate

    root = str(tmp_path) if url is None else url
    if not (tmp_path / "sample").exists():
        generate(
            SampleConfig(str(tmp_path / "sample"), rows=12, eval_rows=12, shards=2, image_size=32), log=lambda *_: None
        )
        first = tmp_path / "sample" / split / "part-00000.parquet"
        table = pq.read_table(first)
        images = pa.array([b"junk"] + table.column("image").to_pylist()[1:], pa.binary())
        pq.write_table(table.set_column(table.schema.get_field_index("image"), "image", images), first)
        if url is not None:
            Location(url, options).fs.put(
                str(tmp_path / "sample") + "/", url[len("s3://") :] + "/sample", recursive=True
            )
    config = dataclasses.replace(CONFIG, input=f"{root}/sample/{split}", output=f"{root}/{output}", mode=mode, **fields)
    options, run = options or StorageOptions(), RunContext("r1", fingerprint(config)[0])
    lease = OutputLease(Location(config.output, options), run.run_id)
    lease.acquire()
    try:
        plan = plan_run(config, options, run.fingerprint, False)
        stage = Rewrite(config, options)
        record_plan(stage, plan, run, time.time())
        batch = shard_rows(plan)
        batch = ShardCaptioner(config, options, run, engine=StubEngine("stub-vlm"))(batch)
        batch = ShardRewriter(config, options, run, engine=StubEngine("stub-llm", answer=lambda r: _echo_alt_text(r)))(
            batch
        )
        assert batch["status"] == ["done", "done"], batch
        return config, summarize(stage, plan, run, 1.0)
    finally:
        lease.release()


def _echo_alt_text(request) -> str:
    """A fusion answer that keeps the AltText's words (so no entity is lost); a rewrite of the prompt's tail."""
    if request.messages is None:
        return "a picture of " + " ".join(request.prompt.split()[-6:])
    text = request.messages[-1]["content"]
    return " ".join(text.replace("<", " ").replace(">", " ").split()[:40])


def test_each_generated_column_names_the_engine_that_made_it(tmp_path):
    """VeCap mode through both actor classes, in-process: vlm_caption's provenance is the captioner's engine."""
    import pyarrow.parquet as pq

    _rewrite_in_process(tmp_path, layout="copy")
    out = pq.read_table(tmp_path / "out" / "part-00000.parquet")
    assert {p["engine"] for p in out.column(schema.provenance_column(schema.VLM_CAPTION)).to_pylist()} == {"stub-vlm"}
    assert {p["engine"] for p in out.column(schema.provenance_column(schema.VECAP)).to_pylist()} == {"stub-llm"}
    assert set(out.column(schema.VLM_CAPTION).to_pylist()) == {"a red star on a blue wall"}


def test_caption_tables_hold_every_input_row_in_order_and_no_images(tmp_path):
    import pyarrow.parquet as pq

    _, summary = _rewrite_in_process(tmp_path, layout="captions")
    source = pq.read_table(tmp_path / "sample" / "train" / "part-00000.parquet")
    captions = pq.read_table(tmp_path / "out" / "part-00000.parquet")
    assert "image" not in captions.column_names and "alt_text" not in captions.column_names
    assert captions.column("key").to_pylist() == source.column("key").to_pylist()  # every row, in the input's order
    assert captions.column(schema.VECAP)[0].as_py() is None and captions.column(schema.REWRITE_FLAGS)[0].as_py()[
        0
    ].startswith("image:")
    assert (
        summary["layout"] == "captions"
        and summary["rows_in"] == 12 == summary["rows_out"] + summary["rows_quarantined"]
    )
    assert summary["rows_quarantined"] == 1


def test_training_joins_caption_tables_to_their_inputs_and_refuses_a_misaligned_one(tmp_path):
    import pyarrow.parquet as pq

    from veclip.dataset import CaptionMismatch
    from veclip.storage import StorageOptions
    from veclip.train.data import plan_data, read_window
    from veclip.train.order import Position

    _rewrite_in_process(tmp_path, layout="captions")
    plan = plan_data(str(tmp_path / "out"), StorageOptions(), schema.ColumnMap(), workers=1, log=lambda *_: None)
    assert plan.dataset.images_url.endswith("sample/train") and plan.caption_columns == (
        schema.VECAP,
        schema.VLM_CAPTION,
        schema.REWRITE_FLAGS,
    )
    assert all(u.captions and u.path.startswith(str(tmp_path / "sample")) for u in plan.units)
    rows = pa.concat_tables(
        read_window({"epoch": np.zeros(1, np.int64), "window": np.zeros(1, np.int64)}, plan, Position(), 0, 1, 0, 8)
    )
    source = pa.concat_tables(
        [pq.read_table(p) for p in sorted((tmp_path / "sample" / "train").glob("*.parquet"))], promote_options="default"
    )
    by_key = dict(zip(source.column("key").to_pylist(), source.column("image").to_pylist()))
    assert rows.num_rows == 12 and all(
        by_key[k] == image for k, image in zip(rows.column("key").to_pylist(), rows.column("image").to_pylist())
    )
    assert rows.column(schema.VLM_CAPTION).null_count == 1  # the broken image's row: joined, with no caption

    captions = tmp_path / "out" / "part-00001.parquet"  # break the alignment: swap two rows
    table = pq.read_table(captions)
    pq.write_table(table.take([1, 0] + list(range(2, table.num_rows))), captions)
    with pytest.raises(
        CaptionMismatch, match=r"part-00001.parquet does not line up with its input .*part-00001.parquet: row 0"
    ):
        list(
            read_window({"epoch": np.zeros(1, np.int64), "window": np.zeros(1, np.int64)}, plan, Position(), 0, 1, 0, 8)
        )


def test_several_caption_outputs_of_one_input_fill_the_caption_slots(tmp_path):
    """A LaCLIP run beside a VeCap run, and a second captioner renamed into a free slot."""
    from veclip.dataset import open_dataset, read_shard
    from veclip.storage import StorageOptions
    from veclip.train.data import plan_data

    _rewrite_in_process(tmp_path, layout="captions")
    _rewrite_in_process(tmp_path, output="laclip", mode="laclip", layout="captions")
    out, laclip = str(tmp_path / "out"), str(tmp_path / "laclip")
    dataset = open_dataset(out, add_captions=(laclip,))
    assert dataset.images_url.endswith(str(tmp_path / "sample" / "train")) and len(dataset.shards) == 2
    rows = read_shard(dataset, dataset.shards[1])
    assert rows.column("image").null_count == 0 and rows.column(schema.VECAP).null_count == 0
    assert rows.column(schema.REWRITES).null_count < rows.num_rows / 2  # the LaCLIP run's, beside the VeCap run's
    assert rows.column(schema.provenance_column(schema.REWRITES))[0].as_py()["engine"] == "stub-llm"
    plan = plan_data(out, StorageOptions(), schema.ColumnMap(), workers=1, add_captions=(laclip,), log=lambda *_: None)
    assert plan.caption_columns == (schema.VECAP, schema.VLM_CAPTION, schema.REWRITES, schema.REWRITE_FLAGS) and all(
        len(u.captions) == 2 for u in plan.units
    )

    # a second captioner's VeCaps: they would take the first's column; renamed, they fill another slot
    _rewrite_in_process(tmp_path, output="second", layout="captions")
    second = str(tmp_path / "second")
    with pytest.raises(
        ValueError, match=r"second would fill \['vecap', 'vlm_caption'\].*--add-captions B#vecap=vlm_caption"
    ):
        open_dataset(out, add_captions=(second,))
    pairings = [
        (out + "#vecap", (second + "#vecap=vlm_caption",)),  # data is a caption output, or the input itself
        (str(tmp_path / "sample" / "train"), (out + "#vecap", second + "#vecap=vlm_caption")),
    ]
    for data, more in pairings:
        both = open_dataset(data, add_captions=more)
        table = read_shard(both, both.shards[0])
        assert (
            table.column(schema.VLM_CAPTION).to_pylist() == table.column(schema.VECAP).to_pylist()
        )  # the two stub runs agree
        assert table.column(schema.VLM_CAPTION).null_count == 1 and schema.REWRITES not in table.column_names
        assert (
            "alt_text" in table.column_names
            and table.column(schema.REWRITE_FLAGS)[0].as_py() == ["image:image_undecodable"] * 2
        )
    with pytest.raises(ValueError, match="may rename vecap and vlm_caption into each other"):
        open_dataset(out, add_captions=(second + "#vecap=rewrites",))
    with pytest.raises(ValueError, match="is not a caption output"):
        open_dataset(out, add_captions=(str(tmp_path / "sample" / "train"),))
    (
        tmp_path / "second" / CURRENT.done / "part-00001.parquet.json"
    ).unlink()  # one shard unfinished there: left out, counted
    partial = open_dataset(out + "#vecap", add_captions=(second + "#vecap=vlm_caption",))
    assert len(partial.shards) == 1 and list(partial.skipped.values()) == [1]


def test_validate_checks_caption_tables_against_their_inputs(tmp_path):
    import pyarrow.parquet as pq

    from veclip.validate import ValidateConfig, validate

    _rewrite_in_process(tmp_path, layout="captions")
    report = validate(ValidateConfig(str(tmp_path / "out"), images="full"))
    assert (
        report.caption_tables_of == str(tmp_path / "out") and report.totals.rows == 12 and report.totals.bad_images == 1
    )
    assert "checked against their inputs" in report.render()
    captions = tmp_path / "out" / "part-00001.parquet"
    table = pq.read_table(captions)
    pq.write_table(table.slice(1), captions)  # a row missing: the table no longer lines up
    broken = validate(ValidateConfig(str(tmp_path / "out"), images="none"))
    assert not broken.usable and [p.kind for p in broken.problems] == ["caption_misaligned"]
    assert "part-00001.parquet" in str(broken.problems[0]) and "first difference at row 0" in str(broken.problems[0])


def test_caption_tables_on_s3_join_and_validate(tmp_path, s3_bucket):
    from veclip.train.data import plan_data, read_window
    from veclip.train.order import Position
    from veclip.validate import ValidateConfig, validate

    url, options = s3_bucket
    _rewrite_in_process(tmp_path, url, options, layout="captions")
    plan = plan_data(url + "/out", options, schema.ColumnMap(), workers=1, log=lambda *_: None)
    assert plan.dataset.images_url == url + "/sample/train"
    rows = pa.concat_tables(
        read_window({"epoch": np.zeros(1, np.int64), "window": np.zeros(1, np.int64)}, plan, Position(), 0, 1, 0, 8)
    )
    assert (
        rows.num_rows == 12 and rows.column("image").null_count == 0 and rows.column(schema.VLM_CAPTION).null_count == 1
    )
    report = validate(ValidateConfig(url + "/out", images="none"), options)
    assert report.usable and report.caption_tables_of == url + "/out" and report.totals.rows == 12


@pytest.mark.slow
@pytest.mark.raytrain
def test_training_runs_on_a_caption_layout_output(tmp_path, ray_session):
    from veclip.train.config import build_config
    from veclip.train.trainer import run_train

    _rewrite_in_process(tmp_path, layout="captions")
    config = build_config(
        "tiny",
        None,
        ["steps=3", "checkpoint_every=3", "scale.num_workers=1", "batch_size=4", "captions.mode=vecap"],
        input=str(tmp_path / "out"),
        output=str(tmp_path / "runs"),
        name="joined",
    )
    summary = run_train(config, log=lambda *_: None)
    assert summary["metrics"]["step"] == 3
    from veclip.status import StatusConfig, status

    report = status(StatusConfig(str(tmp_path / "runs" / "joined")))
    assert report.done and report.kind == "train" and "steps: 3 checkpointed of 3" in report.render()
    assert (
        summary["rows_skipped_by_reason"].get("image_unusable", 0)
        + summary["rows_skipped_by_reason"].get("no_usable_caption", 0)
        >= 1
    )


def test_a_caption_output_read_a_batch_at_a_time_reads_each_caption_table_once(tmp_path, monkeypatch):
    """Score, show and eval read a shard a batch of rows at a time; its caption tables are read once per
    shard and sliced per batch, not read again for every batch (40 times per 10k-row shard on S3)."""
    from veclip import dataset as dataset_module
    from veclip import storage
    from veclip.dataset import open_dataset, read_shard, read_shard_batches

    _rewrite_in_process(tmp_path, layout="captions")
    dataset = open_dataset(str(tmp_path / "out"))
    reads, real = [], dataset_module.read_table
    monkeypatch.setattr(dataset_module, "read_table", lambda fs, path, *a: reads.append(path) or real(fs, path, *a))
    monkeypatch.setattr(storage, "BATCH_ROWS", 2)
    for shard in dataset.shards:
        reads.clear()
        batches = list(read_shard_batches(dataset, shard))
        assert len(batches) == 3 and reads == list(shard.captions)  # 6 rows in batches of 2: each table once
        assert pa.concat_tables(batches).equals(read_shard(dataset, shard))


def test_a_dry_run_plans_what_a_rerun_would_skip_and_writes_nothing(tmp_path):
    """--dry-run: the plan (shards done, to do, pools and what they ask) from a listing and the footers,
    with no lease, no marker, no manifest written; a rerun's skips are the done shards."""
    from veclip.rewrite.stage import dry_run_rewrite

    fresh = dataclasses.replace(CONFIG, input="unused", output=str(tmp_path / "fresh"))
    config, _ = _rewrite_in_process(tmp_path)  # both shards done (stub engines)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    report = dry_run_rewrite(config)
    assert (report["shards_total"], report["shards_done"], report["shards_todo"]) == (2, 2, 0)
    assert report["rows_total"] == 12 and report["fingerprint"] in report["settings"]
    assert set(report["pools"]) == {"captioner", "fuser"} and report["pools"]["captioner"]["actors"] == "1-8"
    todo = dry_run_rewrite(dataclasses.replace(fresh, input=config.input))
    assert (todo["shards_done"], todo["shards_todo"], todo["rows_todo"]) == (0, 2, 12)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written, not even "fresh"
    with pytest.raises(ValueError, match="engine.model is not set"):  # the run's own validation first
        dry_run_rewrite(dataclasses.replace(config, fuser=dataclasses.replace(config.fuser, engine=EngineConfig())))
