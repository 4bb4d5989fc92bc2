"""The main job's report: Markdown plus PNG plots (loss curve, zero-shot and retrieval bars)."""

from __future__ import annotations

import json
from pathlib import Path


def _plot_loss(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.plot([m["step"] for m in history], [m["loss"] for m in history])
    ax.set_xlabel("step")
    ax.set_ylabel("contrastive loss")
    ax.set_title("training loss")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_eval(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = {f"zero-shot {k} top-1": v["top1"] for k, v in results["zero_shot"].items()}
    bars.update({k.replace("_to_", "→").replace("image", "img").replace("text", "txt"): v for k, v in results["retrieval"].items() if k.endswith(("@1", "@5"))})
    fig, ax = plt.subplots(figsize=(6, 3), dpi=100)
    ax.barh(list(bars), [100 * v for v in bars.values()])
    ax.set_xlabel("%")
    ax.set_title("evaluation")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(out: Path, rewrite: dict, train: dict, history: list[dict], evaluation: dict, timings: dict[str, float]) -> Path:
    """Write ``report.md``, ``loss.png`` and ``eval.png`` into ``out``."""
    from veclip.eval.run import render_markdown
    from veclip.rewrite.pipeline import render_summary as render_rewrite

    out.mkdir(parents=True, exist_ok=True)
    _plot_loss(history, out / "loss.png")
    _plot_eval(evaluation, out / "eval.png")
    metrics = train["metrics"]
    lines = [
        "# veclip demo report",
        "",
        "> **The models here are tiny and random.** The rewrite used randomly initialised 2-layer",
        "> LLaVA and Llama models built on the spot (their captions are gibberish, and cleaning flags most of",
        "> them); the CLIP is an 8M-parameter model trained for a minute on 64-px sample scenes.",
        "> A real run uses e.g. LLaVA-1.5-7B and Llama-3-8B-Instruct on GPU actors and ViT-B-16 on",
        "> GPU workers (`--preset default`); this report shows the pipeline, not the method's gains",
        "> (see BENCHMARKS.md for those).",
        "",
        "## Timings",
        "",
        "| stage | seconds |",
        "| --- | --- |",
        *[f"| {name} | {seconds:.1f} |" for name, seconds in timings.items()],
        "",
        "## Rewrite",
        "",
        "```",
        render_rewrite(rewrite),
        "```",
        "",
        "## Training",
        "",
        f"{train['model']}, captions `{train['caption_mode']}`, {metrics['step']} steps, "
        f"final loss {metrics['loss']:.3f}, logit scale {metrics['logit_scale']:.1f}, "
        f"{metrics['samples_per_s']:.0f} samples/s; rows skipped: {json.dumps(train['rows_skipped_by_reason'])}.",
        "",
        "![loss](loss.png)",
        "",
        "## Evaluation",
        "",
        render_markdown(evaluation),
        "![eval](eval.png)",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"
