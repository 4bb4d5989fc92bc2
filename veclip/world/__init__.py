"""The sample world: data whose truth is known, and small models trained on it, for tests and the demo.

Production code never imports this package (the import-graph test checks it);
it registers its rewrite presets through an entry point (:mod:`.presets`).

* :mod:`.scene`, :mod:`.alt_text`, :mod:`.generate`: rendered scenes with countable
  facts and web-like AltText (``veclip sample``);
* :mod:`.tiny`: tiny random vLLM-servable models (the ``tiny`` preset);
* :mod:`.teacher`, :mod:`.facts`, :mod:`.model_training`, :mod:`.build`: a small
  LLaVA captioner and Llama LLM trained here on the world (``veclip models build``);
* :mod:`.quality`: a rewrite output's captions scored against the world's facts.
"""
