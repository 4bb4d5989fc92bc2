"""The GPU presets' captioner settings, checked against tiny twins of their architectures."""

import json
import subprocess

from conftest import REPO


def test_each_presets_captioner_fits_its_engine_settings(vllm_python, tmp_path):
    """LLaVA-1.5 (336 px, patch 14) and Qwen2-VL (patch 14, 2x2 merge, max_pixels = max_image_side^2)
    give 576 image tokens for the largest image the rewrite sends; prompt + caption fit max_model_len;
    one image per request."""
    result = subprocess.run(
        [vllm_python, "tests/vlm_twin_tokens.py"], capture_output=True, text=True, timeout=600, cwd=REPO
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["preset"]: r for r in map(json.loads, result.stdout.strip().splitlines())}
    assert set(rows) == {"default", "qwen2-vl", "qwen2.5-vl"} and rows["default"]["family"] == "llava"
    for row in rows.values():
        assert row["image_tokens"] == 576, row
        assert row["prompt_tokens"] + row["max_tokens"] <= row["max_model_len"] and row["limit_mm_per_prompt"] == 1, row
