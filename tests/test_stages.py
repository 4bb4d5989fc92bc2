"""The stage registry: one way to build every config, docs for every field, README and imports kept honest."""

import ast
import dataclasses
import json
import re
from pathlib import Path

import pytest
from conftest import REPO, veclip_cli

from veclip.cli import command_reference
from veclip.cli.registry import commands, parsed_args
from veclip.config import describe
from veclip.train.config import build_config as train_config


def _presets(name: str) -> tuple[str, ...]:
    return ("default", "tiny") if name in ("rewrite", "train") else ("default",)


@pytest.mark.parametrize("name", sorted(commands()))
def test_every_config_field_says_what_it_does(name):
    for preset in _presets(name):
        undocumented = [key for key, _, doc in describe(commands()[name].preset(preset)) if not doc]
        assert not undocumented, f"{name} --preset {preset}: fields without a docstring: {undocumented}"


def test_config_show_prints_fields_values_and_docs():
    result = veclip_cli("config", "show", "train", "--preset", "tiny")
    assert result.returncode == 0, result.stderr
    assert "scale.num_workers" in result.stdout and "= 2" in result.stdout
    assert "Ray Train workers" in result.stdout  # the field's doc


def test_one_way_to_build_a_config_preset_file_flags_set(tmp_path):
    config_file = tmp_path / "train.json"
    config_file.write_text(json.dumps({"steps": 7, "batch_size": 16, "captions": {"mode": "vecap"}}))
    config = parsed_args(
        "train",
        [
            "--data",
            "d",
            "--output",
            "o",
            "--preset",
            "tiny",
            "--config",
            str(config_file),
            "--caption-mode",
            "laclip",
            "--set",
            "batch_size=8",
        ],
    )
    assert (config.steps, config.batch_size, config.captions.mode, config.model) == (7, 8, "laclip", "veclip-tiny")
    sample = parsed_args("sample", ["--out", "x", "--rows", "10", "--set", "jpeg_quality=70"])
    assert (sample.output, sample.rows, sample.jpeg_quality, sample.eval_rows) == ("x", 10, 70, 500)
    evaluation = parsed_args("eval", ["--model", "m", "--data", "d", "--batch-size", "32", "--cpus-per-worker", "0.5"])
    assert (evaluation.batch_size, evaluation.cpus_per_worker) == (32, 0.5)  # once set only in code
    with pytest.raises(ValueError, match="unknown config field"):
        parsed_args("validate", ["u", "--set", "sample_per_shrad=3"])
    # a flag and the --set it needs are applied together: weighted mode is valid only with its weights
    weighted = parsed_args(
        "train",
        [
            "--data",
            "d#vecap",
            "--output",
            "o",
            "--add-captions",
            "e#vecap=vlm_caption",
            "--caption-mode",
            "weighted",
            "--set",
            'captions.weights={"vecap": 1, "vlm_caption": 1}',
        ],
    )
    assert weighted.captions.weights == {"vecap": 1, "vlm_caption": 1} and weighted.add_captions == (
        "e#vecap=vlm_caption",
    )
    # a tuple given in code stays that tuple (it was once wrapped into a tuple of one tuple)
    assert train_config("tiny", None, [], input="d", output="o", add_captions=()).add_captions == ()
    assert train_config("tiny", None, [], input="d", output="o", add_captions=("a", "b")).add_captions == ("a", "b")
    with pytest.raises(ValueError, match="weighted mode needs"):
        parsed_args("train", ["--data", "d", "--output", "o", "--caption-mode", "weighted"])


def test_the_tiny_rewrite_preset_is_pure(tmp_path, monkeypatch):
    """Building a config builds no models: that happens when a rewrite runs."""
    monkeypatch.setenv("VECLIP_CACHE", str(tmp_path / "cache"))
    config = parsed_args("rewrite", ["--input", "i", "--output", "o", "--preset", "tiny"])
    assert config.fuser.engine.model == str(tmp_path / "cache" / "tiny-models" / "llm")
    assert not (tmp_path / "cache").exists()


def test_the_commands_reference_is_the_parsers():
    reference = (REPO / "docs" / "stages.md").read_text()
    block = reference.split("## Commands\n\n```bash\n", 1)[1].split("```", 1)[0]
    assert block == command_reference(), (
        "docs/stages.md's Commands block is stale; paste veclip.cli.command_reference():\n" + command_reference()
    )


def test_the_front_page_is_short_and_its_links_stay_inside_the_repository():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 300 and "## Module map" in readme
    for target in re.findall(r"\]\(([^)]+)\)", readme):
        assert (REPO / target.split("#")[0]).exists(), target
    for doc in (REPO / "docs").glob("*.md"):
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text()):
            assert (doc.parent / target).exists(), f"{doc.name} links to {target}"


def _imports(path: Path, package_root: Path) -> set[str]:
    """veclip modules ``path`` imports, lazy imports inside functions included."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("veclip"):
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("veclip")}
    return out


def _graph(package_level: bool) -> dict[str, set[str]]:
    """veclip's import graph: of modules, or of packages (a subpackage is one node; a top-level module its own)."""
    root = REPO / "veclip"
    modules = {}
    for path in root.rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path

    def node(module: str) -> str:
        parts = module.split(".")
        return ".".join(parts[:2]) if package_level and len(parts) > 2 else module

    graph: dict[str, set[str]] = {}
    for m, p in modules.items():
        targets = {t for t in _imports(p, root) if t in modules and t != m and not m.startswith(t + ".")}
        graph.setdefault(node(m), set()).update(node(t) for t in targets if node(t) != node(m) and t != "veclip")
    return graph


def _find_circle(graph: dict[str, set[str]]) -> None:
    state, stack = {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(target) :] + [target]))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_the_import_graph_has_no_circles_between_modules_or_packages():
    _find_circle(_graph(package_level=False))
    _find_circle(_graph(package_level=True))


def test_production_code_never_imports_the_sample_world():
    """The world registers its presets through an entry point; the demo, its report and its statistics live in
    it (the CLI's registry names the demo's command by its module's name)."""
    users = {"veclip.world"}
    graph = _graph(package_level=True)
    offenders = sorted(m for m, targets in graph.items() if "veclip.world" in targets and m not in users)
    assert not offenders, f"production packages import veclip.world: {offenders}"


def test_the_sharded_stages_share_the_engine_and_not_each_other():
    graph = _graph(package_level=True)
    assert "veclip.shards" in graph["veclip.rewrite"] and "veclip.shards" in graph["veclip.score"]
    assert "veclip.score" not in graph["veclip.rewrite"] and "veclip.rewrite" not in graph["veclip.score"]
    assert not graph["veclip.shards"] & {
        "veclip.rewrite",
        "veclip.score",
        "veclip.train",
        "veclip.eval",
        "veclip.world",
    }


def test_one_flag_vocabulary_with_the_old_spellings_kept():
    assert parsed_args("train", ["--input", "d", "--output", "o"]) == parsed_args(
        "train", ["--data", "d", "--output", "o"]
    )
    assert parsed_args("eval", ["--model", "m", "--input", "d", "--output", "x"]) == parsed_args(
        "eval", ["--model", "m", "--data", "d", "--out", "x"]
    )
    assert parsed_args("sample", ["--output", "x"]).output == parsed_args("sample", ["--out", "x"]).output == "x"


def test_a_stage_with_nothing_to_read_says_so_the_same_way(tmp_path):
    from veclip.eval.run import EvalConfig, evaluate
    from veclip.rewrite.config import preset
    from veclip.rewrite.stage import plan_run
    from veclip.storage import StorageOptions

    (tmp_path / "in").mkdir()
    with pytest.raises(FileNotFoundError, match=r"eval: no .parquet shards in .*veclip import"):
        evaluate(EvalConfig(model="unused", input=str(tmp_path / "in")))
    config = dataclasses.replace(preset("default"), input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match=r"rewrite: no .parquet shards in .*veclip import"):
        plan_run(config, StorageOptions(), "f", False)


@dataclasses.dataclass(frozen=True)
class _ToyConfig:
    input: str = ""
    """what the toy reads"""
    output: str = ""
    """where the toy writes"""
    knob: int = 7
    """how far the toy turns its knob"""


def test_a_documented_config_field_is_a_flag_with_help_a_docs_line_and_the_submit_and_pipeline_checks(
    monkeypatch, tmp_path, capsys
):
    """A command is declared once: adding a field with its documentation to the toy's config (``knob``) is the
    only edit that makes its flag, its help, its line in docs/stages.md's block and its submit/pipeline checks."""
    from veclip.cli import build_parser, main, registry
    from veclip.cli.registry import checked_args, run_checked_pipeline
    from veclip.pipeline import PipelineConfig

    monkeypatch.setitem(registry.DECLARED, "toy", "test_stages:TOY")
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert "--knob N how far the toy turns its knob (default 7)" in " ".join(sub.choices["toy"].format_help().split())
    line = next(line for line in command_reference().splitlines() if line.startswith("veclip toy"))
    assert "[--knob N]" in line and "--config" not in line  # every field is a flag: nothing to --set
    assert checked_args("toy", ["--input", "a", "--output", "b", "--knob", "3"]).knob == 3
    with pytest.raises(SystemExit):  # argparse: the field's type
        checked_args("toy", ["--knob", "three"])
    assert main(["toy", "--knob", "12"]) == 3 and "toy: knob at 12" in capsys.readouterr().out
    spec = tmp_path / "toy.yaml"
    spec.write_text("name: toy\nsteps:\n  - name: turn\n    run: toy --input {input} --output {output} --knob 4\n")
    config = PipelineConfig(str(spec), "in", str(tmp_path / "out"), dry_run=True)
    assert run_checked_pipeline(config, log=lambda line: None) == 0
    spec.write_text(spec.read_text().replace("--knob 4", "--knob four"))
    with pytest.raises((SystemExit, ValueError)):
        run_checked_pipeline(config, log=lambda line: None)


def test_every_reader_of_a_run_summary_goes_through_its_type():
    """A summary is written as JSON and read back only through its type's ``from_json`` (RunSummary, its
    stages' subclasses, TrainSummary): no library module reads a summary's keys by name."""
    readers = [
        f"{path.relative_to(REPO)}:{n}"
        for path in sorted((REPO / "veclip").rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\bsummary(\[[\"']|\.get\()", line) and "``" not in line
    ]
    assert not readers, readers


def test_a_stage_summary_reads_back_as_it_was_written():
    from veclip.rewrite.stage import RewriteSummary
    from veclip.shards.summary import RunSummary, ShardCounts

    common = dict(stage="rewrite", input="i", output="o", run_id="r", fingerprint="f", rows_in=3, rows_out=2)
    common |= dict(rows_quarantined=1, rows_in_failed_shards=0, failed={}, wall_seconds=2.0)
    summary = RewriteSummary(
        **common,
        shards=ShardCounts(1, 1, 1, 0),
        rows_per_second_this_run=1.5,
        config={"captioner": {"engine": {"model": "m1"}}, "fuser": {"engine": {"model": "m2"}}},
        mode="both",
        pools={"fuser": {"requests": 3}},
        details={"extra": 1},
    )
    written = json.loads(json.dumps(summary.to_json()))
    assert written["mode"] == "both" and written["extra"] == 1 and "details" not in written  # one flat object
    assert RewriteSummary.from_json(written) == summary
    assert RunSummary.from_json(written).models == {"captioner.engine.model": "m1", "fuser.engine.model": "m2"}


def _turn(config, options, run_options):
    from veclip.command import Said

    return Said(f"toy: knob at {config.knob}", 0 if config.knob < 10 else 3)


def _toy():
    from veclip.command import Command

    return Command("toy", "a toy stage", _ToyConfig, _turn, submittable=True)


TOY = _toy()
