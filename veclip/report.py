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
    if (out / "gallery.html").exists():
        lines += ["## Captions beside their images", "", "[gallery.html](gallery.html) (`veclip show`)", "", "@gallery.html", ""]
    (out / "report.md").write_text("\n".join(line for line in lines if not line.startswith("@")))
    (out / "report.html").write_text(to_html(lines, out))
    return out / "report.md"


def to_html(lines: list[str], folder: Path) -> str:
    """The report's Markdown subset as one page: headings, quotes, tables, code, paragraphs; its
    plots inline (base64), so the page stands alone; ``@file`` lines embed a page of the folder."""
    import base64
    import html
    import re

    def inline(text: str) -> str:
        text = html.escape(text)
        text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
        text = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)
        return re.sub(r"\[([^]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', text)

    body, table, code = [], [], None
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
        if table:
            head, *rows = table
            body.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in head) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>" for row in rows) + "</table>")
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
    style = ("body{font:14px system-ui,sans-serif;margin:24px auto;max-width:960px;color:#222}table{border-collapse:collapse;margin:8px 0}"
             "td,th{border:1px solid #ddd;padding:4px 8px;text-align:left}pre{background:#f6f6f6;padding:8px;overflow:auto}"
             "blockquote{margin:0;padding:0 12px;border-left:4px solid #e0b000;color:#555}img{max-width:100%}"
             "iframe{width:100%;height:800px;border:1px solid #ddd}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>veclip demo report</title><style>{style}</style></head><body>{''.join(body)}</body></html>"
