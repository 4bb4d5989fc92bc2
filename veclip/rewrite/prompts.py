"""Prompts: versioned data files, and the builders that put untrusted text in them.

AltText is untrusted: it enters prompts only as data — inside delimiting tags
in a user message (fusion) or on one ``source =>`` line (LaCLIP) — with the
characters that could close a tag or start a new line neutralised. An AltText
that says "ignore the instructions" cannot change the system message, the
examples, or the task.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from veclip.config import load_named_json

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def load_prompt_file(name_or_path: str) -> dict:
    """A shipped prompt file by name (``fusion-v1``) or a user's JSON file by path."""
    return load_named_json(name_or_path, "veclip.rewrite", "prompts", "prompt file")


def as_data(text: str | None, max_chars: int) -> str:
    """Untrusted text made safe to embed: one line, no tags, no control bytes, bounded."""
    text = _CONTROL.sub(" ", text or "")
    text = text.replace("<", "‹").replace(">", "›")  # cannot open or close our delimiters
    text = " ".join(text.split())  # one line: cannot fake a new "source =>" line or a role
    return text[:max_chars]


@dataclass(frozen=True)
class CaptionerPrompt:
    version: str
    instruction: str

    @classmethod
    def load(cls, name: str) -> CaptionerPrompt:
        data = load_prompt_file(name)
        return cls(data["version"], data["instruction"])


@dataclass(frozen=True)
class FusionPrompt:
    version: str
    system: str
    examples: tuple[dict, ...]
    user_template: str
    empty_alt_text: str

    @classmethod
    def load(cls, name: str) -> FusionPrompt:
        data = load_prompt_file(name)
        return cls(
            data["version"], data["system"], tuple(data["examples"]), data["user_template"], data["empty_alt_text"]
        )

    def messages(self, alt_text: str | None, visual: str, max_chars: int = 1000) -> list[dict]:
        """Chat messages: system, few-shot turns, then this row's inputs as data."""
        out = [{"role": "system", "content": self.system}]
        for ex in self.examples:
            out.append({"role": "user", "content": self._user(ex["alt_text"], ex["visual"], max_chars)})
            out.append({"role": "assistant", "content": ex["caption"]})
        out.append({"role": "user", "content": self._user(alt_text, visual, max_chars)})
        return out

    def _user(self, alt_text: str | None, visual: str, max_chars: int) -> str:
        alt = as_data(alt_text, max_chars) or self.empty_alt_text
        return self.user_template.format(alt_text=alt, visual=as_data(visual, max_chars))


@dataclass(frozen=True)
class LaClipPrompt:
    version: str
    separator: str
    pools: dict[str, tuple[tuple[str, str], ...]]

    @classmethod
    def load(cls, name: str) -> LaClipPrompt:
        data = load_prompt_file(name)
        pools = {source: tuple(tuple(pair) for pair in pairs) for source, pairs in data["pools"].items()}
        return cls(data["version"], data["separator"], pools)

    def prompts(
        self, key: str, alt_text: str | None, n: int, shots: int, seed: int, max_chars: int = 1000
    ) -> list[str]:
        """``n`` completion prompts, the i-th with ``shots`` exemplars from source ``i mod sources``.

        Exemplars are drawn per row from ``(seed, key, i)``: reproducible, and
        independent of batching and workers.
        """
        sources = sorted(self.pools)
        text = as_data(alt_text, max_chars)
        out = []
        for i in range(n):
            pool = self.pools[sources[i % len(sources)]]
            rng = random.Random(f"{seed}:{key}:{i}")
            lines = [f"{src}{self.separator}{tgt}" for src, tgt in rng.sample(pool, min(shots, len(pool)))]
            out.append("\n".join([*lines, f"{text}{self.separator.rstrip()}"]))
        return out


def request_seed(seed: int, key: str, i: int = 0) -> int:
    """A per-row, per-sample seed so generation is reproducible whatever the batching."""
    return random.Random(f"{seed}:{key}:gen:{i}").getrandbits(31)
