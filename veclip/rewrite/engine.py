"""Engines behind one small protocol; vLLM is the production one.

Prompts, cleaning and parsing live elsewhere and do not care which engine
runs. vLLM is imported only when an engine is built, so this module imports
in the driver's environment too.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

from veclip.rewrite.config import EngineConfig, SamplingConfig


@dataclass
class Request:
    """One generation: a raw ``prompt`` or chat ``messages``, an optional image, a seed."""

    prompt: str | None = None
    messages: list[dict] | None = None
    image: Any = None  # a PIL image
    seed: int | None = None


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    generated_tokens: int
    error: str | None = None  # a reason code when the request could not run, e.g. prompt_too_long


PROMPT_TOO_LONG = "prompt_too_long"


class Engine(Protocol):
    name: str  # provenance, e.g. "vllm-0.32.0"

    def generate(self, requests: list[Request], sampling: SamplingConfig) -> list[Completion]: ...


def _descendants() -> list:
    import psutil

    return psutil.Process().children(recursive=True)


def _watch_engine_processes(processes: list, every_seconds: float = 2.0) -> None:
    """vLLM runs its engine in child processes. When one dies, vLLM usually raises
    ``EngineDeadError``, but not always: a request can wait forever. This watchdog
    exits the actor as soon as an engine process is gone, so Ray replaces it with a
    fresh engine and retries the shard (the durable try count bounds how often)."""
    import psutil

    def alive(process) -> bool:
        try:
            return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def engine_process(process) -> bool:
        try:
            return alive(process) and "resource_tracker" not in " ".join(process.cmdline())
        except psutil.Error:
            return False

    processes = [p for p in processes if engine_process(p)]
    if not processes:
        return  # an in-process engine: nothing to watch

    def watch():
        while True:
            time.sleep(every_seconds)
            for process in processes:
                if not alive(process):
                    print(f"veclip: vLLM engine process {process.pid} died; exiting so Ray starts a fresh actor", flush=True)
                    os._exit(1)

    threading.Thread(target=watch, name="veclip-engine-watchdog", daemon=True).start()


class VLLMEngine:
    """``vllm.LLM`` in-process: chat templates, image inputs, per-request seeds."""

    def __init__(self, config: EngineConfig, multimodal: bool = False):
        os.environ.update({k: str(v) for k, v in config.env.items()})  # before vLLM reads them
        import vllm

        kwargs = dict(
            model=config.model,
            tensor_parallel_size=config.tensor_parallel_size,
            max_model_len=config.max_model_len,
            gpu_memory_utilization=config.gpu_memory_utilization,
            dtype=config.dtype,
            enforce_eager=config.enforce_eager,
            seed=0,
        )
        if not config.chunked_prefill:
            kwargs["enable_chunked_prefill"] = False
        if multimodal:
            kwargs["limit_mm_per_prompt"] = {"image": config.limit_mm_per_prompt}
            if config.mm_processor_kwargs:
                kwargs["mm_processor_kwargs"] = dict(config.mm_processor_kwargs)
        before = _descendants()
        self.llm = vllm.LLM(**kwargs)
        _watch_engine_processes([p for p in _descendants() if p.pid not in before])
        self.seeded = config.seeded_requests
        self.max_model_len = config.max_model_len
        self.name = f"vllm-{vllm.__version__}"

    def _prompt_tokens(self, request: Request) -> int:
        tokenizer = self.llm.get_tokenizer()
        if request.messages is not None:
            text = tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=False)
            return len(tokenizer.encode(text, add_special_tokens=False))
        return len(tokenizer.encode(request.prompt))

    def generate(self, requests: list[Request], sampling: SamplingConfig) -> list[Completion]:
        """Requests whose text prompt leaves no room to generate come back with an
        error instead of failing the whole batch (vLLM rejects a batch with one)."""
        results: list[Completion | None] = [None] * len(requests)
        runnable = []
        for i, request in enumerate(requests):
            if request.image is None and self._prompt_tokens(request) + sampling.max_tokens > self.max_model_len:
                results[i] = Completion("", 0, 0, PROMPT_TOO_LONG)
            else:
                runnable.append(i)
        for i, completion in zip(runnable, self._generate([requests[i] for i in runnable], sampling)):
            results[i] = completion
        return results

    def _generate(self, requests: list[Request], sampling: SamplingConfig) -> list[Completion]:
        from vllm import SamplingParams

        if not requests:
            return []

        params = [
            SamplingParams(
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_tokens,
                stop=list(sampling.stop) or None,
                seed=r.seed if self.seeded else None,
            )
            for r in requests
        ]
        if requests and all(r.messages is not None for r in requests):
            outputs = self.llm.chat([self._chat(r) for r in requests], params, use_tqdm=False)
        else:
            prompts = [
                {"prompt": r.prompt, **({"multi_modal_data": {"image": r.image}} if r.image is not None else {})}
                for r in requests
            ]
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [
            Completion(out.outputs[0].text, len(out.prompt_token_ids or ()), len(out.outputs[0].token_ids))
            for out in outputs
        ]

    @staticmethod
    def _chat(request: Request) -> list[dict]:
        """Put the image, if any, into the last user turn as an image part."""
        if request.image is None:
            return request.messages
        *head, last = request.messages
        parts = [{"type": "image_pil", "image_pil": request.image}, {"type": "text", "text": last["content"]}]
        return [*head, {**last, "content": parts}]
