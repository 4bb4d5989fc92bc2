"""Run in the vLLM environment by tests/test_vlm_presets.py: each GPU preset's captioner settings
applied to the tiny twin of its architecture (built with the same processor settings), the
default prompt file's instruction and the largest image the rewrite sends (max_image_side
square). Prints one JSON line per preset: prompt tokens, image tokens, what the engine allows."""

import json

from PIL import Image
from transformers import AutoProcessor

from veclip.rewrite.config import PRESETS, preset
from veclip.rewrite.prompts import CaptionerPrompt
from veclip.world.presets import tiny_models_dir
from veclip.world.tiny import build, model_paths

if __name__ == "__main__":
    build(tiny_models_dir())
    twins = model_paths(tiny_models_dir())
    for name in PRESETS:
        config = preset(name)
        engine = config.captioner.engine
        family = "llava" if "llava" in engine.model.lower() else "qwen2_vl"
        processor = AutoProcessor.from_pretrained(twins[family], **engine.mm_processor_kwargs)
        instruction = CaptionerPrompt.load(config.captioner.prompts).instruction
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        image = Image.new("RGB", (config.max_image_side, config.max_image_side), (120, 40, 200))
        ids = processor(text=[text], images=[image], return_tensors="np")["input_ids"][0].tolist()
        image_token = processor.tokenizer.convert_tokens_to_ids("<image>" if family == "llava" else "<|image_pad|>")
        print(
            json.dumps(
                {
                    "preset": name,
                    "family": family,
                    "prompt_tokens": len(ids),
                    "image_tokens": ids.count(image_token),
                    "max_tokens": config.captioner.sampling.max_tokens,
                    "max_model_len": engine.max_model_len,
                    "limit_mm_per_prompt": engine.limit_mm_per_prompt,
                }
            )
        )
