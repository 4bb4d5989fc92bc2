"""``veclip plan``: the rewrite's own counts on sampled rows of the real input, projected onto every row,
with GPU-hours and dollars from the documented estimates or a calibration run."""

from __future__ import annotations

import dataclasses
import json

import pytest

from veclip.plan import ESTIMATED_RATES, PRICES, TEMPORARY, plan_rewrite, render_plan
from veclip.rewrite.config import build_from
from veclip.shards.layout import CURRENT
from veclip.world.generate import SampleConfig, generate


def _quiet(*_):
    pass


@pytest.mark.slow
def test_a_plan_measures_sampled_rows_and_projects_them_onto_the_input(tmp_path, vllm_python, monkeypatch):
    monkeypatch.setenv("VECLIP_VLLM_PYTHON", vllm_python)
    sample = SampleConfig(str(tmp_path / "sample"), rows=240, eval_rows=1, shards=4, image_size=32)
    generate(sample, log=_quiet)
    fields = {"input": str(tmp_path / "sample" / "train"), "mode": "laclip", "output": str(tmp_path / "scratch")}
    config = build_from("tiny", None, fields, [])
    plan = plan_rewrite(config, rows=16, log=_quiet)
    assert plan["rows_total"] == 240 and plan["shards_total"] == 4 and plan["sampled_rows"] == 16
    [laclip] = plan["pools"]
    measured = json.loads((tmp_path / "scratch" / "rewrite" / CURRENT.summary).read_text())
    # every figure is the measuring run's (the engines' own counts) per row, times the input's rows
    assert laclip["role"] == "laclip" and 0 < laclip["per_row"]["requests"] <= config.num_rewrites
    for key, value in laclip["per_row"].items():
        assert value == pytest.approx(measured["pools"]["laclip"][key] / 16) and value > 0
        assert laclip["totals"][key] == pytest.approx(value * 240)
    low, high = ESTIMATED_RATES["laclip"]
    hours = laclip["gpu_hours"]["H100"]
    assert hours == pytest.approx(
        (laclip["totals"]["requests"] / high / 3600, laclip["totals"]["requests"] / low / 3600)
    )
    text = render_plan(plan)
    assert (
        "[estimate] docs/scaling.md" in text and f"${PRICES['H100']}/GPU-h" in text and "240 rows in 4 shards" in text
    )

    # --simulate: the projected run on the documented H100 rates, both ends, labelled as simulated
    from veclip.plan import simulated_runs
    from veclip.shards.simulate import Fleet, render_runs, simulate

    [(label, sim), _] = simulated_runs(plan, config, "H100", 5.0, Fleet(preemption_per_hour=0.0))
    assert label.startswith("fast end of the rates: laclip") and "[estimate]" in label
    assert sim.shards == 4 and sim.rows_per_shard == 60 and sim.pools[0].name == "laclip"
    run = simulate(sim, str(tmp_path / "simulated"))
    assert run.finished and run.shards_done == 4
    assert "SIMULATED (not measured)" in render_runs(sim, [run])

    # the measuring run itself as a calibration: its rates, labelled, priced as given
    calibration = str(tmp_path / "scratch" / "rewrite")
    again = dataclasses.replace(config, output=TEMPORARY)
    calibrated = plan_rewrite(again, rows=16, calibration=calibration, prices={"GPU": 2.5}, log=_quiet)
    [pool] = calibrated["pools"]
    assert pool["source"].startswith("[calibrated]") and list(pool["rates"]) == ["GPU"]
    assert "$2.5/GPU-h" in render_plan(calibrated)


def test_sampling_reads_the_first_pages_of_a_shard_not_its_whole_row_group(tmp_path, monkeypatch):
    """A 10,000-row shard is one ~1 GB row group as most writers make it: the plan's 64 sampled rows once
    fetched all of it. Here a 100 MB one-group shard as veclip writes it (pages of PAGE_ROWS rows)."""
    import os

    import pyarrow as pa
    from fsspec.implementations.local import LocalFileSystem

    from veclip.parquet_files import write_parquet
    from veclip.plan import sample_rows
    from veclip.rewrite.config import preset
    from veclip.storage import StorageOptions

    (tmp_path / "in").mkdir()
    rows = 1000
    table = pa.table({"key": [f"{i:05d}" for i in range(rows)], "image": [os.urandom(100_000)] * rows})
    write_parquet(LocalFileSystem(), str(tmp_path / "in" / "part-00000.parquet"), table, target_bytes=1 << 30)
    read = []
    opened = LocalFileSystem._open

    class Counting:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def __getattr__(self, name):
            return getattr(self.f, name)

        def read(self, n=-1):
            data = self.f.read(n)
            read.append(len(data))
            return data

    monkeypatch.setattr(
        LocalFileSystem, "_open", lambda fs, path, mode="rb", **kw: Counting(opened(fs, path, mode, **kw))
    )
    config = dataclasses.replace(preset("tiny"), input=str(tmp_path / "in"))
    taken, shards = sample_rows(config, StorageOptions(), 64, tmp_path / "sample")
    assert (taken, shards) == (64, 1)
    assert sum(read) < 20e6, f"{sum(read) / 1e6:.0f} MB read of a {table.nbytes / 1e6:.0f} MB shard for 64 rows"
