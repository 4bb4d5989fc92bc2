"""The main job's report: Markdown plus PNG plots (loss curve, zero-shot and retrieval bars)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from veclip.train.summary import TrainSummary

MODE_NAMES = {"alttext": "AltText only", "vecap": "VeCap only", "mix": "VeCLIP mix", "laclip": "LaCLIP"}


# The headline metrics (the demo's report, bench_mixing): no single caption style owns them (issue 29).
# name -> (what it is, the keys of eval's ranks.json it reads, k: a hit is a rank < k)
METRICS = {
    "shape": ("zero-shot shape (6 classes)", ("zero_shot/generic/label_shape",), 1),
    "brand_generic": ("brand zero-shot, 'a photo of a {}.'", ("zero_shot/generic/label_brand",), 1),
    "brand_descriptive": ("brand zero-shot, descriptive prompts", ("zero_shot/brands/label_brand",), 1),
    "brand_probe": ("brand probe (texts differ only in the name)", ("choice/probe_brand",), 1),
    "R5_caption": (
        "R@5, captioner's style",
        ("retrieval/caption/image_to_text", "retrieval/caption/text_to_image"),
        5,
    ),
    "R5_plain": (
        "R@5, held-out style",
        ("retrieval/caption_plain/image_to_text", "retrieval/caption_plain/text_to_image"),
        5,
    ),
}
# veclip eval's settings that produce them on a sample eval split (pipelines/demo.yaml passes the same as flags)
EVAL_SETTINGS = {
    "label_column": "label_shape,label_brand",
    "caption_column": "caption,caption_plain",
    "choice_column": "probe_brand",
    "templates": "generic,brands",
}


def mean_recall(retrieval: dict, k: int) -> float:
    """Retrieval R@k, the mean of image->text and text->image."""
    return (retrieval[f"image_to_text_R@{k}"] + retrieval[f"text_to_image_R@{k}"]) / 2


def take_off_step(history: list[dict], global_batch: int, margin: float = 0.25, window: int = 10) -> int | None:
    """The first step of the first ``window`` steps whose mean loss is ``margin`` under chance (ln of the
    global batch, where a contrastive CLIP starts and can sit for tens of steps); None if it never is.
    Until then an eval figure says when the run left the plateau more than what its captions taught."""
    losses = [m["loss"] for m in history]
    chance = math.log(global_batch)
    for i in range(max(0, len(losses) - window + 1)):
        if sum(losses[i : i + window]) / window < chance - margin:
            return history[i]["step"]
    return None


def _plateau(history: list[dict], train: TrainSummary) -> str:
    """Where the run left the chance plateau, said in words, from its metrics."""
    config = train.config
    per_worker = config["batch_size"]
    if config["captions"]["budget_neutral"]:
        per_worker = max(2, per_worker // config["captions"]["per_image"])
    batch = per_worker * config["scale"]["num_workers"]
    step = take_off_step(history, batch)
    chance = f"chance loss ln {batch} = {math.log(batch):.2f}"
    if step is None:
        return f"**never left the chance plateau** ({chance}): its eval figures say nothing of its captions"
    return f"left the chance plateau ({chance}) at step {step} of {len(history)}"


def per_image(ranks: dict, metric: str) -> np.ndarray:
    """Each eval image's hit on ``metric`` (0/1; retrieval: the mean of its two ways), from ``ranks.json``."""
    _, keys, k = METRICS[metric]
    return np.mean([np.asarray(ranks[key]) < k for key in keys], axis=0)


def comparison(runs: dict) -> str:
    """The modes side by side on every headline metric, and each mode's difference from the first (the
    baseline) with its 95% interval: a paired bootstrap over the eval images (one run per mode: the
    interval is the eval set's uncertainty, not the training seed's)."""
    from veclip.world.stats import paired_bootstrap

    modes = list(runs)
    base = modes[0]
    present = [m for m in METRICS if all(key in run["ranks"] for run in runs.values() for key in METRICS[m][1])]
    head = ["metric", *[MODE_NAMES.get(m, m) for m in modes]]
    head += [f"{MODE_NAMES.get(m, m)} - {MODE_NAMES.get(base, base)} [95%]" for m in modes[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for metric in present:
        hits = {mode: per_image(run["ranks"], metric) for mode, run in runs.items()}
        cells = [METRICS[metric][0], *[f"{100 * hits[m].mean():.1f}%" for m in modes]]
        cells += [str(paired_bootstrap(hits[m], hits[base])) for m in modes[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot_loss(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    for mode, run in runs.items():
        ax.plot([m["step"] for m in run["history"]], [m["loss"] for m in run["history"]], label=mode)
    ax.set_xlabel("step")
    ax.set_ylabel("contrastive loss")
    ax.set_title("training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_eval(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in METRICS if all(key in run["ranks"] for run in runs.values() for key in METRICS[m][1])]
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    height = 0.8 / len(runs)
    for i, (mode, run) in enumerate(runs.items()):
        values = [100 * per_image(run["ranks"], m).mean() for m in metrics]
        ax.barh(np.arange(len(metrics)) + i * height, values, height, label=mode)
    ax.set_yticks(np.arange(len(metrics)) + height * (len(runs) - 1) / 2, [METRICS[m][0] for m in metrics])
    ax.invert_yaxis()
    ax.set_xlabel("%")
    ax.set_title("evaluation on the held-out split")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(
    out: Path,
    rewrite: dict,
    quality: dict,
    models: dict,
    runs: dict,
    timings: dict[str, float],
    gate: dict | None = None,
) -> Path:
    """Write ``report.md``, ``report.html``, ``loss.png`` and ``eval.png`` into ``out``. ``runs``: per
    caption mode, its train summary, eval results and loss history; ``gate``: the score stage's summary."""
    from veclip.eval.run import render_markdown
    from veclip.rewrite.stage import render_summary as render_rewrite
    from veclip.world.build import render as render_models
    from veclip.world.quality import render as render_quality

    out.mkdir(parents=True, exist_ok=True)
    _plot_loss(runs, out / "loss.png")
    _plot_eval(runs, out / "eval.png")
    lines = [
        "# veclip demo report",
        "",
        "> **Small models, trained here.** The captioner (LLaVA architecture, 64 px) and the instruction LLM",
        "> (Llama) were trained on this machine on the sample world (`veclip models build`) and served by vLLM",
        "> exactly as a user's models are; the CLIPs are 8M-parameter models trained for a few minutes on",
        "> 64-px scenes. A real run uses e.g. LLaVA-1.5-7B and Llama-3-8B-Instruct on GPU actors and ViT-B-16",
        "> on GPU workers (`--preset default`). The figures are this world's, not the papers'.",
        "",
        "## Timings",
        "",
        "| stage | seconds |",
        "| --- | --- |",
        *[f"| {name} | {seconds:.1f} |" for name, seconds in timings.items()],
        "",
        "## Models",
        "",
        "```",
        render_models(models),
        "```",
        "",
        "## Rewrite",
        "",
        "```",
        render_rewrite(rewrite),
        "",
        render_quality(quality, "the demo's train split"),
        "```",
        "",
        "## Training",
        "",
    ]
    for mode, run in runs.items():
        train = TrainSummary.from_json(run["train"])
        lines.append(
            f"- **{MODE_NAMES.get(mode, mode)}** (`{mode}`): {train.model}, {train.step} steps, final loss "
            f"{train.metrics['loss']:.3f}, {train.samples_per_s:.0f} samples/s over the run "
            f"({train.wall_seconds:.0f} s); {_plateau(run['history'], train)}; "
            f"rows skipped: {json.dumps(train.rows_skipped_by_reason)}."
        )
    lines += [
        "",
        "![loss](loss.png)",
        "",
        "## Evaluation",
        "",
        "Held-out eval split (brand metrics on its branded scenes). No caption style owns the verdict: brand",
        "zero-shot with two prompt styles ('a photo of a {}.' reads like AltText; descriptive prompts), a probe",
        "whose candidate texts differ only in the brand name (in the fused captions' style), and retrieval R@5",
        "(mean of both ways) with captions in the captioner's style and in a held-out style.",
        "",
        comparison(runs),
        "",
        "**What this run shows, and what it cannot.** One training run per mode: the intervals (a paired",
        "bootstrap over the eval images) cover the eval set's sampling, not a second training seed. An interval",
        "that excludes 0 says these two CLIPs differ on these images; whether the caption modes do, across seeds,",
        "is `benchmarks/bench_mixing.py`'s question (5 seeds, paired intervals, docs/model-quality.md). Read the",
        "figures after the take-off steps above: a CLIP still on its plateau has learnt nothing from its captions.",
        "",
        "![eval](eval.png)",
        "",
    ]
    for mode, run in runs.items():
        lines += [
            f"### {MODE_NAMES.get(mode, mode)}",
            "",
            render_markdown(run["eval"]).replace("# Evaluation of", "Evaluation of", 1),
        ]
    if gate:
        from veclip.score.stage import render_summary as render_gate

        lines += [
            "## Caption gate",
            "",
            "Every caption scored against its image by the last CLIP above (`veclip score`); the lowest tenth of each",
            "column per shard is flagged, and training with `--add-captions` the scores passes over flagged captions.",
            "The gallery shows the scores and flags beside the images.",
            "",
            "```",
            render_gate(gate),
            "```",
            "",
        ]
    if (out / "gallery.html").exists():
        lines += [
            "## Captions beside their images",
            "",
            "[gallery.html](gallery.html) (`veclip show`)",
            "",
            "@gallery.html",
            "",
        ]
    (out / "report.md").write_text("\n".join(line for line in lines if not line.startswith("@")))
    (out / "report.html").write_text(to_html(lines, out))
    return out / "report.md"


def to_html(lines: list[str], folder: Path) -> str:
    """The report's Markdown subset as one page: headings, quotes, tables, lists, code, paragraphs; its
    plots inline (base64), so the page stands alone; ``@file`` lines embed a page of the folder."""
    import base64
    import html
    import re

    def inline(text: str) -> str:
        text = html.escape(text)
        text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
        text = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)
        return re.sub(r"\[([^]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', text)

    body, table, items, code = [], [], [], None
    for line in [*"\n".join(lines).split("\n"), ""]:  # an item may hold several lines (a rendered table)
        if code is not None:
            if line.startswith("```"):
                body.append("<pre>" + html.escape("\n".join(code)) + "</pre>")
                code = None
            else:
                code.append(line)
            continue
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not all(set(c) <= {"-", " ", ":"} for c in cells):
                table.append(cells)
            continue
        if line.startswith("- "):
            items.append(line[2:])
            continue
        if items:
            body.append("<ul>" + "".join(f"<li>{inline(item)}</li>" for item in items) + "</ul>")
            items = []
        if table:
            head, *rows = table
            body.append(
                "<table><tr>"
                + "".join(f"<th>{inline(c)}</th>" for c in head)
                + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>" for row in rows)
                + "</table>"
            )
            table = []
        if line.startswith("```"):
            code = []
        elif image := re.fullmatch(r"!\[([^]]*)\]\(([^)]+)\)", line.strip()):
            data = base64.b64encode((folder / image.group(2)).read_bytes()).decode()
            body.append(f'<img alt="{html.escape(image.group(1))}" src="data:image/png;base64,{data}">')
        elif line.startswith("@"):
            body.append(f'<iframe src="{html.escape(line[1:])}" title="gallery"></iframe>')
        elif heading := re.match(r"(#+) (.*)", line):
            level = len(heading.group(1))
            body.append(f"<h{level}>{inline(heading.group(2))}</h{level}>")
        elif line.startswith(">"):
            body.append(f"<blockquote>{inline(line.lstrip('> '))}</blockquote>")
        elif line.strip():
            body.append(f"<p>{inline(line)}</p>")
    style = (
        "body{font:14px system-ui,sans-serif;margin:24px auto;max-width:960px;color:#222}"
        "table{border-collapse:collapse;margin:8px 0}"
        "td,th{border:1px solid #ddd;padding:4px 8px;text-align:left}pre{background:#f6f6f6;padding:8px;overflow:auto}"
        "blockquote{margin:0;padding:0 12px;border-left:4px solid #e0b000;color:#555}img{max-width:100%}"
        "iframe{width:100%;height:800px;border:1px solid #ddd}"
    )
    head = f"<head><meta charset='utf-8'><title>veclip demo report</title><style>{style}</style></head>"
    return f"<!doctype html><html>{head}<body>{''.join(body)}</body></html>"
