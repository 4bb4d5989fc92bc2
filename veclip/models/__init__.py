"""Small real models trained here on the sample world, served by vLLM like a user's.

* :mod:`teacher` — what each model should write, from the sample generator's facts.
* :mod:`facts` — visual facts and names parsed back from any caption, and the quality metrics.
* :mod:`train` — the training (runs in the vLLM environment, which has transformers).
* :mod:`build` — ``veclip models build``: cached, versioned, deterministic by seed.
"""
