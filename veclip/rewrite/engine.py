"""Engines behind one small protocol; vLLM is the production one.

Prompts, cleaning and parsing live elsewhere and do not care which engine
runs. :class:`VLLMEngine` may be called from several threads at once (the
shards an actor works on): a feeder thread adds every call's requests to the
one running engine, so vLLM's continuous batching spans shards. vLLM is
imported only when an engine is built, so this module imports in the
driver's environment too.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Protocol

from veclip.rewrite.config import EngineConfig, SamplingConfig
from veclip.rewrite.reaper import reap_orphaned_engines, start_reaper
from veclip.shards.guard import engine_died
from veclip.shards.isolation import KILLED_THE_ENGINE, Isolation


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
REQUEST_REFUSED = "request_refused"  # vLLM refused the request itself (e.g. an image its processor cannot take)
# The feeder's seconds outside a step: preparing inputs (vLLM's multimodal processor runs as requests are added;
# the engine core, its own process, goes on with what it has), or nothing queued (no request in the engine:
# the GPU idle while the shards' threads read and decode)
PREPARING, IDLE = "preparing", "idle"
WAITS = {PREPARING: "preparing inputs", IDLE: "nothing queued"}  # each wait, as summaries and status name it
# An engine step that has not returned in this long is hung (a stuck GPU, NCCL): it must exceed the longest step
# (a prefill of a full batch: seconds on an H100, a minute or two for a 7B model on CPU)
STEP_STALL_SECONDS = 900.0


class EngineGone(RuntimeError):
    """The engine feeder died or the engine hung: this actor exits, Ray starts a fresh one (ShardGuard)."""

    fatal_to_actor = True


class Engine(Protocol):
    name: str  # provenance, e.g. "vllm-0.32.0"

    def generate(self, requests: list[Request], sampling: SamplingConfig) -> list[Completion]: ...


def _descendants() -> list:
    import psutil

    return psutil.Process().children(recursive=True)


def _watch_engine_processes(processes: list, every_seconds: float = 2.0) -> None:  # far below a shard's minutes
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
                    print(
                        f"veclip: vLLM engine process {process.pid} died; exiting so Ray starts a fresh actor",
                        flush=True,
                    )
                    os._exit(1)

    threading.Thread(target=watch, name="veclip-engine-watchdog", daemon=True).start()


def start_llm(config: EngineConfig, multimodal: bool = False):
    """A ``vllm.LLM`` for an engine config, its environment set first (the benchmarks' bare engines too)."""
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
    return vllm.LLM(**kwargs)


def sampling_params(sampling: SamplingConfig, seed: int | None):
    from vllm import SamplingParams

    return SamplingParams(
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        max_tokens=sampling.max_tokens,
        stop=list(sampling.stop) or None,
        seed=seed,
    )


class VLLMEngine:
    """``vllm.LLM`` in-process: chat templates, image inputs, per-request seeds."""

    def __init__(self, config: EngineConfig, multimodal: bool = False):
        import vllm

        reap_orphaned_engines()  # what a dead actor left on this GPU would fail vLLM's memory check
        reaper = start_reaper()  # before the engine: a death during its minutes of start-up leaves none behind
        before = {p.pid for p in _descendants()} | {reaper.pid}
        self.llm = start_llm(config, multimodal)
        _watch_engine_processes([p for p in _descendants() if p.pid not in before])
        self.seeded = config.seeded_requests
        self.max_model_len = config.max_model_len
        self.name = f"vllm-{vllm.__version__}"
        self._start_feeding()

    def _start_feeding(self, stall_seconds: float = STEP_STALL_SECONDS) -> None:
        self.busy_seconds = 0.0  # wall seconds the engine ran steps (the busy share's numerator)
        self.waits = dict.fromkeys(WAITS, 0.0)  # and the feeder's seconds outside one, by why
        self._idle_since: float | None = None  # when the wait for a submission began (None: not waiting)
        self.completed = 0  # requests finished: the stall watch's sign of progress inside a shard
        self._dead: BaseException | None = None
        self._stepping_since: float | None = None  # when the running engine.step() began (None: not in one)
        self.stall_seconds = stall_seconds
        self._submissions: queue.Queue[_Submission] = queue.Queue()
        threading.Thread(target=self._feed, name="veclip-engine-feeder", daemon=True).start()

    def _prompt_tokens(self, request: Request) -> int:
        tokenizer = self.llm.get_tokenizer()
        if request.messages is not None:
            text = tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=False)
            return len(tokenizer.encode(text, add_special_tokens=False))
        return len(tokenizer.encode(request.prompt))

    def time_counts(self) -> tuple[float, dict[str, float]]:
        """The running counts now: seconds in steps, and without one by why (a wait in progress included: a
        shard that starts while the engine idles must not have that idle time counted as its own)."""
        waits, since = dict(self.waits), self._idle_since
        if since is not None:
            waits[IDLE] += time.perf_counter() - since
        return self.busy_seconds, waits

    def generate(self, requests: list[Request], sampling: SamplingConfig) -> list[Completion]:
        """Safe from any thread: the requests join the running engine (see :meth:`_feed`)."""
        if not requests:
            return []
        submission = _Submission(requests, sampling)
        self._submissions.put(submission)
        return submission.result(self._failure)

    def _failure(self) -> BaseException | None:
        """Why no submission can finish any more: the feeder died, or a step has hung."""
        since = self._stepping_since
        if self._dead is None and since is not None and time.perf_counter() - since > self.stall_seconds:
            self._dead = EngineGone(
                f"a vLLM engine step has not returned in {self.stall_seconds:.0f} s: the engine hung"
            )
        return self._dead

    # --- the feeder: one thread owns the engine and keeps it fed -----------------------------------

    def _feed(self) -> None:
        """Add every waiting submission to the engine between its steps, and step it while any
        request is unfinished. Callers on other threads (the shards an actor works on at once)
        only wait for their submission, so the next shard's requests join the running batch
        instead of waiting for the last one's tail to drain. ``busy_seconds`` is the engine's
        wall time in steps; ``waits`` its time outside them, preparing inputs or with nothing queued."""
        waiting: dict[str, tuple[_Submission, int]] = {}  # request id -> (submission, its index there)
        try:
            self._feed_forever(waiting)
        except BaseException as err:  # noqa: BLE001 - whatever stops the feeder: every caller, now and later, hears it
            traceback.print_exc()
            self._dead = (
                err if engine_died(err) else EngineGone(f"the vLLM engine feeder died: {type(err).__name__}: {err}")
            )
            for submission in {id(s): s for s, _ in waiting.values()}.values():
                submission.fail(self._dead)

    def _feed_forever(self, waiting: dict) -> None:
        engine, now = self.llm.llm_engine, time.perf_counter
        while True:
            idle, asked = not engine.has_unfinished_requests(), now()
            self._idle_since = asked if idle else None  # nothing to run until a caller submits
            arrived = _drain(self._submissions, block=idle)
            preparing, self._idle_since = now(), None
            if idle:
                self.waits[IDLE] += preparing - asked
            for submission in arrived:
                try:
                    ids = self._enqueue(submission)
                except Exception as err:  # a request vLLM refuses: its caller's error, not the engine's
                    submission.fail(err)
                    continue
                waiting.update({_external_id(rid): (submission, i) for i, rid in zip(submission.runnable, ids)})
            stepping = now()
            self.waits[PREPARING] += stepping - preparing  # vLLM's input processing runs as requests are added
            if not engine.has_unfinished_requests():
                continue
            self._stepping_since = stepping
            outputs = engine.step()
            self._stepping_since = None
            for output in outputs:
                entry = waiting.pop(_external_id(output.request_id), None) if output.finished else None
                if entry is not None:  # (None: a request of a submission that failed while being queued)
                    entry[0].done(entry[1], _completion(output))
                    self.completed += 1
            self.busy_seconds += now() - stepping

    def _enqueue(self, submission: "_Submission") -> list[str]:
        """Queue a submission's requests in the engine; those whose text prompt leaves no room to
        generate are answered at once with an error (vLLM would refuse the whole call)."""
        sampling = submission.sampling
        for i, request in enumerate(submission.requests):
            if request.image is None and self._prompt_tokens(request) + sampling.max_tokens > self.max_model_len:
                submission.done(i, Completion("", 0, 0, PROMPT_TOO_LONG))
            else:
                submission.runnable.append(i)
        try:
            return self._add([submission.requests[i] for i in submission.runnable], sampling)
        except Exception as err:  # noqa: BLE001 - one request vLLM refuses must not fail its whole shard
            print(
                f"veclip: vLLM refused a batch ({type(err).__name__}: {err}); adding its requests one by one",
                flush=True,
            )
        runnable, ids = submission.runnable, []
        submission.runnable = []
        for i in runnable:
            try:
                ids += self._add([submission.requests[i]], sampling)
                submission.runnable.append(i)
            except Exception as err:  # noqa: BLE001 - this row is flagged with the reason; the shard goes on
                print(f"veclip: vLLM refused a request ({type(err).__name__}: {str(err)[:300]})", flush=True)
                submission.done(i, Completion("", 0, 0, REQUEST_REFUSED))
        return ids

    def _add(self, requests: list[Request], sampling: SamplingConfig) -> list[str]:
        """Queue requests in the engine (vLLM adds all of them or, refusing one, none); their request ids."""
        if not requests:
            return []
        params = [sampling_params(sampling, r.seed if self.seeded else None) for r in requests]
        if all(r.messages is not None for r in requests):
            return self.llm.enqueue_chat([self._chat(r) for r in requests], params, use_tqdm=False)
        prompts = [
            {"prompt": r.prompt, **({"multi_modal_data": {"image": r.image}} if r.image is not None else {})}
            for r in requests
        ]
        return self.llm.enqueue(prompts, params, use_tqdm=False)

    @staticmethod
    def _chat(request: Request) -> list[dict]:
        """Put the image, if any, into the last user turn as an image part."""
        if request.image is None:
            return request.messages
        *head, last = request.messages
        parts = [{"type": "image_pil", "image_pil": request.image}, {"type": "text", "text": last["content"]}]
        return [*head, {**last, "content": parts}]


class IsolatedEngine:
    """An engine as an isolated try uses it (:mod:`veclip.shards.isolation`): requests sent a noted range at a
    time, a poison one answered with :data:`KILLED_THE_ENGINE` without running."""

    def __init__(self, engine: Engine, isolation: Isolation):
        self.engine, self.isolation = engine, isolation

    def __getattr__(self, name: str):
        return getattr(self.engine, name)  # its name and counts

    def generate(self, requests: list[Request], sampling: SamplingConfig) -> list[Completion]:
        out = [Completion("", 0, 0, KILLED_THE_ENGINE)] * len(requests)
        first = self.isolation.sent
        for run in self.isolation.ranges(len(requests)):
            out[run.start - first : run.stop - first] = self.engine.generate(
                requests[run.start - first : run.stop - first], sampling
            )
        return out


def isolated(engine: Engine, isolation: Isolation | None) -> Engine:
    """The engine a shard's work uses: itself, or seen through the shard's isolated try."""
    return engine if isolation is None else IsolatedEngine(engine, isolation)


def _external_id(request_id: str) -> str:
    """vLLM 0.32's ``enqueue`` answers internal ids ``"<n>-<suffix>"`` while finished outputs carry
    ``"<n>"``: key both by ``<n>``. Refuse any other format loudly rather than wait for an output forever."""
    counter = request_id.split("-", 1)[0]
    if not counter.isdigit():
        raise RuntimeError(
            f"vLLM request id {request_id!r} is not '<n>' or '<n>-<suffix>': the engine feeder needs updating"
        )
    return counter


def _completion(output) -> Completion:
    return Completion(output.outputs[0].text, len(output.prompt_token_ids or ()), len(output.outputs[0].token_ids))


class _Submission:
    """One caller's requests, waiting for all their completions."""

    def __init__(self, requests: list[Request], sampling: SamplingConfig):
        self.requests, self.sampling = requests, sampling
        self.runnable: list[int] = []  # indices sent to the engine
        self.completions: list[Completion | None] = [None] * len(requests)
        self.left = len(requests)
        self.error: BaseException | None = None
        self.finished = threading.Event()

    def done(self, index: int, completion: Completion) -> None:
        self.completions[index] = completion
        self.left -= 1
        if self.left == 0:
            self.finished.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.finished.set()

    def result(self, engine_error) -> list[Completion]:
        """Wait for every completion; raise the engine's error if it died first."""
        while not self.finished.wait(1.0):  # how soon a caller hears of a dead engine: well below a request
            if engine_error() is not None:
                raise engine_error()
        if self.error is not None:
            raise self.error
        return self.completions


def _drain(submissions: "queue.Queue[_Submission]", block: bool) -> list["_Submission"]:
    """Everything waiting; with ``block``, wait for the first one (an idle engine has nothing to do)."""
    items = [submissions.get()] if block else []
    while True:
        try:
            items.append(submissions.get_nowait())
        except queue.Empty:
            return items
