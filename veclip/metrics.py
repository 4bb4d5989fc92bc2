"""Ray metrics, where Ray users look: the dashboard's Prometheus endpoint and Grafana.

The sharded stages' actors (rewrite, score) publish, per shard they write, its rows, engine tokens by pool,
flags and quarantines by reason, and its seconds; train workers publish, per
step, the step, samples/s, data wait and MFU. Each process makes its metrics on
first use (Ray metrics belong to the process that records them); names start
with ``veclip_`` (Ray exports them as ``ray_veclip_...``).
"""

from __future__ import annotations

import functools

SHARD_SECONDS = [1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600]


@functools.cache
def _shards():
    from ray.util.metrics import Counter, Histogram

    return {
        "rows": Counter("veclip_rewrite_rows", "input rows of the shards written", ("stage",)),
        "tokens": Counter("veclip_rewrite_tokens", "engine tokens, prompt or generated, by pool", ("pool", "kind")),
        "flags": Counter("veclip_rewrite_flags", "generated captions flagged, by reason", ("reason",)),
        "quarantined": Counter("veclip_rewrite_quarantined", "rows quarantined, by reason", ("reason",)),
        "shard_seconds": Histogram("veclip_rewrite_shard_seconds", "seconds per shard", SHARD_SECONDS, ("stage",)),
    }


def publish_shard(stage: str, marker) -> None:
    """One written shard's figures (its :class:`~veclip.shards.marker.Marker`)."""
    m = _shards()
    m["rows"].inc(marker.input_rows, {"stage": stage})
    m["shard_seconds"].observe(marker.seconds, {"stage": stage})
    for pool, counts in marker.pools.items():
        for kind, n in (("prompt", counts.prompt_tokens), ("generated", counts.generated_tokens)):
            if n:
                m["tokens"].inc(n, {"pool": pool, "kind": kind})
    for reason, n in marker.flags.items():
        m["flags"].inc(n, {"reason": reason})
    for reason, n in marker.quarantine_reasons.items():
        m["quarantined"].inc(n, {"reason": reason})


@functools.cache
def _train():
    from ray.util.metrics import Counter, Gauge

    tags = ("run", "rank")
    return {
        "step": Gauge("veclip_train_step", "the last step done", tags),
        "samples": Counter("veclip_train_samples", "samples trained on, per worker", tags),
        "samples_per_s": Gauge("veclip_train_samples_per_second", "the last step's samples/s, all workers", tags),
        "data_wait": Gauge(
            "veclip_train_data_wait_share", "the last step's share of time spent waiting for data", tags
        ),
        "mfu": Gauge("veclip_train_mfu", "model FLOPs utilisation of the last step (GPU workers)", tags),
        "loss": Gauge("veclip_train_loss", "the last step's contrastive loss", tags),
    }


def publish_step(run: str, rank: int, metrics: dict, samples: int) -> None:
    m, tags = _train(), {"run": run, "rank": str(rank)}
    m["step"].set(metrics["step"], tags)
    m["samples"].inc(samples, tags)
    for name, key in (
        ("samples_per_s", "samples_per_s"),
        ("data_wait", "data_wait_share"),
        ("mfu", "mfu"),
        ("loss", "loss"),
    ):
        if metrics.get(key) is not None:
            m[name].set(metrics[key], tags)
