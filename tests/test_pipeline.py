"""Pipelines: the shipped files parse and their commands build configs; a recipe runs end to end at tiny
scale exactly as a user types it, and a rerun is a no-op; a failed step is resumed from."""

import json
import time

import pytest
from conftest import veclip_cli

from veclip.cli.registry import run_checked_pipeline
from veclip.pipeline import RECORDS_DIR, PipelineConfig, available, load, run_pipeline

RECIPES = ("demo", "laclip-3m", "laclip-12m", "laclip-300m", "veclip-3m", "veclip-12m", "veclip-300m")
TINY = [
    "rewrite_preset=tiny",
    "train_preset=tiny",
    "laclip_actors=1",
    "train_workers=2",
    "batch_size=8",
    "steps=4",
    "checkpoint_every=4",
]


def test_every_shipped_pipeline_is_there_and_its_commands_build_their_configs():
    assert set(RECIPES) <= set(available())
    for name in available():
        config = PipelineConfig(name, "s3://b/in", "s3://b/out", dry_run=True)
        assert run_checked_pipeline(config, log=lambda *_: None) == 0


def test_vars_placeholders_and_conditions(tmp_path):
    pipeline = load("laclip-3m")
    commands = dict((s.name, c) for s, c in pipeline.commands("in", "out/", {"steps": "7"}))
    assert commands["eval"] is None  # no eval_data: skipped
    assert "steps=7" in commands["clip"] and commands["captions"][:5] == [
        "rewrite",
        "--input",
        "in",
        "--output",
        "out/captions",
    ]
    with pytest.raises(ValueError, match="no var 'step'"):
        pipeline.commands("in", "out", {"step": "7"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nsteps:\n  - name: a\n    run: sample --output {output}/x --rows {rows}\n")
    with pytest.raises(ValueError, match=r"\{rows\} is not a var"):
        run_checked_pipeline(PipelineConfig(str(bad), "i", str(tmp_path / "o")), log=lambda *_: None)
    typo = tmp_path / "typo.yaml"
    typo.write_text("name: typo\nsteps:\n  - name: a\n    run: sample --output {output}/x --rowz 3\n")
    with pytest.raises(ValueError, match="step a: bad command"):  # checked before any step runs
        run_checked_pipeline(PipelineConfig(str(typo), "i", str(tmp_path / "o")), log=lambda *_: None)
    stageless = tmp_path / "stageless.yaml"
    stageless.write_text("name: s\nsteps:\n  - name: a\n    run: smaple --output {output}\n")
    with pytest.raises(ValueError, match="step a: no command 'smaple'"):
        run_checked_pipeline(PipelineConfig(str(stageless), "i", str(tmp_path / "o")), log=lambda *_: None)


def test_a_failed_step_stops_the_pipeline_and_a_rerun_resumes_there(tmp_path):
    spec = tmp_path / "two.yaml"
    spec.write_text(
        "name: two\nsteps:\n"
        "  - name: data\n    run: sample --output {output}/data --rows 8 --eval-rows 4 --shards 1 --image-size 32\n"
        "  - name: check\n    run: validate {input} --images none\n"
    )
    lines = []
    config = PipelineConfig(str(spec), str(tmp_path / "missing"), str(tmp_path / "run"))
    assert run_pipeline(config, log=lines.append) != 0 and "step check failed" in lines[-1]
    assert (tmp_path / "run" / RECORDS_DIR / "data.json").exists() and not (
        tmp_path / "run" / RECORDS_DIR / "check.json"
    ).exists()
    lines.clear()
    fixed = PipelineConfig(str(spec), str(tmp_path / "run" / "data" / "train"), str(tmp_path / "run"))
    assert run_pipeline(fixed, log=lines.append) == 0
    assert any("data: done" in line for line in lines)  # not sampled again


def test_a_killed_pipeline_takes_its_running_step_with_it(tmp_path):
    """`veclip demo` killed left its `veclip train` step writing on into the run a rerun then wrote too:
    the step now dies with its pipeline, even when the pipeline is killed without a chance to clean up."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from conftest import descendants

    spec = tmp_path / "long.yaml"
    run = "sample --output {output}/data --rows 200000 --eval-rows 4 --shards 1 --image-size 64"
    spec.write_text(f"name: long\nsteps:\n  - name: data\n    run: {run}\n")
    exe = str(Path(sys.executable).with_name("veclip"))
    pipeline = subprocess.Popen([exe, "pipeline", str(spec), "--input", "x", "--output", str(tmp_path / "run")])
    deadline = time.monotonic() + 60
    while not (steps := [p for p, cmd in descendants(pipeline.pid).items() if "veclip.cli sample" in cmd]):
        assert time.monotonic() < deadline and pipeline.poll() is None
        time.sleep(0.2)
    os.kill(pipeline.pid, signal.SIGKILL)
    pipeline.wait()
    deadline = time.monotonic() + 30
    while Path(f"/proc/{steps[0]}").exists() and "veclip" in Path(f"/proc/{steps[0]}/cmdline").read_text():
        assert time.monotonic() < deadline, "the step outlived its pipeline"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_recipe_end_to_end_at_tiny_scale_then_a_rerun_is_a_no_op(sample_root, tmp_path, vllm_python):
    """laclip-3m as a user runs it (the CLI, from another folder), with its scale vars set to this machine's."""
    args = ["pipeline", "laclip-3m", "--input", str(sample_root / "train"), "--output", str(tmp_path / "run")]
    args += [f"--var={v}" for v in [*TINY, f"eval_data={sample_root / 'eval'}"]]
    first = veclip_cli(*args, env={"VECLIP_VLLM_PYTHON": vllm_python}, timeout=1500)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "rewrite (laclip): 60 rows in -> 60 out" in first.stdout and "pipeline laclip-3m: done" in first.stdout
    records = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "run" / RECORDS_DIR).glob("*.json")}
    assert set(records) == {"captions", "clip", "eval"}
    assert json.loads((tmp_path / "run" / "runs" / "clip" / "summary.json").read_text())["metrics"]["step"] == 4
    assert (tmp_path / "run" / "eval" / "eval.json").exists()

    start = time.perf_counter()
    again = veclip_cli(*args, env={"VECLIP_VLLM_PYTHON": vllm_python}, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count(": done (") == 3 and "veclip rewrite" not in again.stdout
    assert {p.stem: json.loads(p.read_text()) for p in (tmp_path / "run" / RECORDS_DIR).glob("*.json")} == records
    assert time.perf_counter() - start < 120  # no engine, no training: the records said every step was done


def test_the_shipped_pipelines_are_found_from_an_installed_wheel(tmp_path):
    """`veclip pipeline NAME` looked in the repository's pipelines/, which a wheel and the cluster image lack:
    after `pip install` no shipped pipeline was found. They are package data now: a wheel built from this tree,
    installed apart and run outside the repository, finds every one."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "w"), str(root)], check=True
    )
    [wheel] = (tmp_path / "w").glob("veclip-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)], check=True)
    code = (
        "import veclip, sys; from veclip.cli import main; print('from', veclip.__file__); "
        "sys.exit(main(['pipeline', 'veclip-300m', '--dry-run', '--input', 's3://b/in', '--output', 's3://b/out']))"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(tmp_path / "site")}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"from {tmp_path / 'site'}" in result.stdout and "pipeline veclip-300m:" in result.stdout, result.stdout
    assert sorted(p.name for p in (tmp_path / "site" / "veclip" / "pipelines").glob("*.yaml")) == sorted(
        f"{name}.yaml" for name in available()
    )
