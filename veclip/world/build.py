"""``veclip models build``: the trained models, built once and cached by version, seed and scale.

Training runs in the vLLM environment (it has transformers) as a child process;
its progress lines are shown and its full log kept beside the models. The
build goes to a temporary folder that is renamed when complete, so a killed
build leaves nothing that looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from veclip.command import Command, Flag, Said

BUILD_VERSION = "trained-v3"  # bump when training data, targets or architectures change (v3: world 3's AltText)
ROLES = ("captioner", "llm")


@dataclass(frozen=True)
class ModelsConfig:
    output: str = ""
    """where to build (default: the cache, $VECLIP_CACHE/trained-models/...)"""
    scale: Literal["full", "quick"] = "full"
    """full (the demo's, ~10 min on 2 cores) or quick (tests, ~3 min)"""
    seed: int = 0
    """training data, initialisation and order all derive from it"""

    def __post_init__(self):
        if self.scale not in ("full", "quick"):
            raise ValueError(f"models: scale must be full or quick, got {self.scale!r}")


def models_dir(config: ModelsConfig = ModelsConfig()) -> Path:
    if config.output:
        return Path(config.output)
    from veclip.environments import cache_dir

    return cache_dir() / "trained-models" / f"{BUILD_VERSION}-{config.scale}-seed{config.seed}"


def model_paths(folder: Path) -> dict[str, str]:
    """Where the models are (or will be): known without building them."""
    return {role: str(folder / role) for role in ROLES}


def built(folder: Path) -> dict | None:
    """The build's record (version, quality) if a complete build of this version is there."""
    stamp = folder / "models.json"
    if stamp.exists() and (record := json.loads(stamp.read_text())).get("version") == BUILD_VERSION:
        return record
    return None


def ensure_built(config: ModelsConfig = ModelsConfig(), python: str | None = None, log=print) -> dict:
    """Build unless built; returns the record: version, paths, quality on held-out scenes."""
    from veclip.environments import default_vllm_python

    folder = models_dir(config)
    if record := built(folder):
        return record
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    cmd = [
        python or default_vllm_python() or sys.executable,
        "-m",
        "veclip.world.model_training",
        "--out",
        str(partial),
        "--scale",
        config.scale,
        "--seed",
        str(config.seed),
    ]
    log(f"models: building {config.scale} models (seed {config.seed}) into {folder}; log: {folder}/build.log")
    with open(partial / "build.log", "w") as log_file:
        process = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=log_file, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"}
        )
        for line in process.stdout:
            log_file.write(line)
            if line.startswith("models: "):
                log(line.rstrip())
        if process.wait() != 0:
            raise RuntimeError(f"models: training failed ({' '.join(cmd)}); see {partial}/build.log")
    quality = json.loads((partial / "quality.json").read_text())
    record = {
        "version": BUILD_VERSION,
        "scale": config.scale,
        "seed": config.seed,
        "paths": model_paths(folder),
        "quality": quality,
    }
    (partial / "models.json").write_text(json.dumps(record, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return record


def render(record: dict) -> str:
    """A few lines on what was built and how good it is on held-out scenes."""
    q = record["quality"]
    cap, llm = q.get("captioner", {}), q.get("llm", {})
    kinds = ", ".join(f"{k} {v:.2f}" for k, v in cap.get("by_kind", {}).items())
    lines = [
        f"models: {record['version']} ({record['scale']}, seed {record['seed']}), built in {q.get('seconds', 0):.0f}s",
        f"  captioner {record['paths']['captioner']}",
        f"    fact recall {cap.get('recall', 0):.2f}, precision {cap.get('precision', 0):.2f} on {cap.get('rows')} "
        f"held-out images ({kinds})",
        f"  llm       {record['paths']['llm']}",
    ]
    if llm:
        lines.append(
            f"    fusion keeps {llm['fusion_entities']['entities']:.2f} of AltText names and "
            f"{llm['fusion_facts']['facts']:.2f} "
            f"of visual facts; LaCLIP rewrites keep {llm['rewrite_retention']:.2f} of their source's words"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class ModelsRun:
    action: Literal["build"] = "build"
    """build: train the captioner VLM and the instruction LLM (cached)"""


def run(config: ModelsConfig, options=None, run: ModelsRun | None = None) -> Said:
    return Said(render(ensure_built(config)))


COMMAND = Command(
    "models",
    "train small real models on the sample world (captioner VLM, instruction LLM) for the trained presets",
    ModelsConfig,
    run,
    flags=(Flag("output", aliases=("--out",), metavar="DIR"), "scale", "seed"),
    options=ModelsRun,
    run_flags=(Flag("action", "action"),),
)
