"""The rewrite pipeline vs the bare vLLM engine on the same rows and prompts.

    VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python benchmarks/bench_rewrite.py [--rows 400]

Runs in the vLLM environment (both sides in one script). The bare side is
``vllm.LLM.generate`` over the LaCLIP prompts of every row; the pipeline side
is ``run_rewrite(mode=laclip)`` on the same rows (Ray Data, an actor pool,
Parquet in and out, cleaning, done markers). Steady-state rows/s excludes
engine start-up on both sides; end-to-end wall time is reported too.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time

import pyarrow.parquet as pq


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--shards", type=int, default=4)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    import ray
    import vllm

    from veclip.rewrite.config import build_config
    from veclip.rewrite.pipeline import run_rewrite
    from veclip.rewrite.prompts import LaClipPrompt
    from veclip.sample import SampleConfig, generate

    tmp = tempfile.mkdtemp()
    generate(SampleConfig(tmp, rows=args.rows, eval_rows=1, shards=args.shards, image_size=32), log=lambda *_: None)
    config = build_config("tiny", input=f"{tmp}/train", output=f"{tmp}/out", mode="laclip")
    config = dataclasses.replace(config, laclip=dataclasses.replace(config.laclip, pool=dataclasses.replace(config.laclip.pool, python=None)))

    # bare engine: same prompts, same sampling, no Ray, no Parquet
    table = pq.read_table(f"{tmp}/train", columns=["key", "alt_text"]).to_pylist()
    laclip = LaClipPrompt.load(config.laclip.prompts)
    prompts = [p for r in table if (r["alt_text"] or "").strip() for p in laclip.prompts(r["key"], r["alt_text"], config.num_rewrites, config.shots, 0)]
    engine = config.laclip.engine
    t0 = time.perf_counter()
    llm = vllm.LLM(engine.model, max_model_len=engine.max_model_len, gpu_memory_utilization=engine.gpu_memory_utilization, dtype=engine.dtype, enforce_eager=engine.enforce_eager, seed=0)
    t1 = time.perf_counter()
    s = config.laclip.sampling
    outs = llm.generate(prompts, vllm.SamplingParams(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens, stop=list(s.stop)), use_tqdm=False)
    bare_seconds = time.perf_counter() - t1
    bare_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    bare_wall = time.perf_counter() - t0
    del llm

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    t0 = time.perf_counter()
    summary = run_rewrite(config, log=lambda *_: None)
    wall = time.perf_counter() - t0
    steady = summary["stage_seconds"]["rewrite"]  # per-shard time inside actors: read, generate, clean, write
    pool = summary["pools"]["laclip"]
    ray.shutdown()

    rows = args.rows
    print("| path | rows | requests | steady rows/s | generated tok/s (steady) | wall incl. start-up (s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| bare vllm.LLM.generate | {rows} | {len(prompts)} | {rows / bare_seconds:.1f} | {bare_tokens / bare_seconds:.0f} | {bare_wall:.1f} |")
    print(f"| veclip rewrite (laclip) | {rows} | {pool['requests']} | {rows / steady:.1f} | {pool['generated_tokens'] / steady:.0f} | {wall:.1f} |")
    print(f"\nratio (pipeline / bare, steady rows/s): {bare_seconds / steady:.2f}")


if __name__ == "__main__":
    main()
