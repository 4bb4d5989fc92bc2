"""The engine of every sharded stage: each input shard mapped to an output shard exactly once.

``rewrite`` and ``score`` (and any next stage of the kind) are a config with
its fingerprint, actor pools and a per-shard ``process()``; everything that
makes them exactly-once lives here, once:

* :mod:`~veclip.shards.layout`: the output's file and folder names;
* :mod:`~veclip.shards.marker`: the typed done marker and failure record;
* :mod:`~veclip.shards.store`: whole-shard writes, markers, failures, readers;
* :mod:`~veclip.shards.lease`: one writer per output (compare-and-swap);
* :mod:`~veclip.shards.guard`: retries, the durable try count, failure records;
* :mod:`~veclip.shards.isolation`: engine deaths charged to no shard, poison requests found;
* :mod:`~veclip.shards.plan`: what is done, what is left, what cannot run;
* :mod:`~veclip.shards.worker`: the actor base (``process()``, ``commit()``);
* :mod:`~veclip.shards.stage`: what a stage is (``ShardedStage`` and its ``Pool`` list);
* :mod:`~veclip.shards.driver`: the run (lease, plan, pools, progress);
* :mod:`~veclip.shards.stall`: the stall watch;
* :mod:`~veclip.shards.summary`: every row reconciled, the run summary.

``docs/design.md`` shows a new stage built on it.
"""
