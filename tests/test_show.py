"""veclip show: rows of any dataset or stage output, captions beside their images."""

import re

from conftest import browser_screenshot, veclip_cli
from test_rewrite_steps import _rewrite_in_process

from veclip import schema
from veclip.shards.layout import CURRENT
from veclip.show import ShowConfig, show


def test_show_joins_a_caption_output_to_its_images_in_the_terminal_and_in_html(tmp_path):
    _rewrite_in_process(tmp_path, layout="captions")  # the first input image is broken
    out = str(tmp_path / "out")
    text = show(ShowConfig(out, rows=3))
    assert text.startswith(f"3 row(s) of {out}; captions from {out} joined to images in ")
    first_key = text.splitlines()[2].split()[0]
    assert "[image: image_undecodable]" in text.splitlines()[2] and "image:image_undecodable" in text
    assert (
        "vecap" in text and "a red star on a blue wall" in text and re.search(r"\[image: 32x32, [\d,]+ bytes\]", text)
    )

    flagged = show(ShowConfig(out, where="image_undecodable", rows=5))
    assert flagged.startswith("1 row(s)") and first_key in flagged
    by_key = show(ShowConfig(out, keys=(first_key,)))
    assert by_key.startswith("1 row(s)")
    second_page = show(ShowConfig(out, rows=3, offset=3))
    assert first_key not in second_page and second_page.startswith("3 row(s)")

    page = tmp_path / "gallery.html"
    said = show(ShowConfig(out, rows=12, html=str(page), page_rows=5))
    assert "12 row(s)" in said and "3 page(s)" in said and (tmp_path / "gallery-3.html").exists()
    first = page.read_text()
    assert (
        first.count("data:image/jpeg;base64,") == 4 and 'class="noimg">image_undecodable' in first
    )  # one image broken
    assert first.count('class="key"') == 5 and 'href="gallery-2.html"' in first and "stub-vlm" in first  # provenance


def test_show_reads_quarantine_and_s3(tmp_path, s3_bucket):
    url, options = s3_bucket
    _rewrite_in_process(tmp_path, url, options, layout="captions")
    text = show(ShowConfig(url + "/out", rows=2), options)
    assert text.startswith(f"2 row(s) of {url}/out; captions from {url}/out joined to images in {url}/sample/train")
    quarantined = show(ShowConfig(f"{url}/out/{CURRENT.quarantine}"), options)
    assert quarantined.startswith("1 row(s)") and "reason         image_undecodable" in quarantined


def test_show_from_the_command_line(tmp_path):
    _rewrite_in_process(tmp_path, layout="captions")
    result = veclip_cli("show", str(tmp_path / "out"), "--rows", "2", "--where", "image:")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("1 row(s)") and schema.REWRITE_FLAGS in result.stdout
    assert "no such folder" in veclip_cli("show", str(tmp_path / "nothing")).stderr
    (tmp_path / "empty").mkdir()
    result = veclip_cli("show", str(tmp_path / "empty"))
    assert result.returncode != 0 and "show: no .parquet shards" in result.stderr


def test_status_of_a_rewrite_output_finished_then_live(tmp_path):
    import json

    _rewrite_in_process(tmp_path, layout="captions")
    out = tmp_path / "out"
    result = veclip_cli("status", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        result.stdout.startswith(f"rewrite {out}: DONE")
        and "shards: 2 done, 0 failed, 0 remaining of 2" in result.stdout
    )
    assert "rows: 12 done of 12" in result.stdout and "quarantined:image_undecodable 1" in result.stdout
    (
        out / CURRENT.done / "part-00001.parquet.json"
    ).unlink()  # a shard still being written, by a run that holds the lease
    (out / CURRENT.lease).write_text(json.dumps({"run_id": "r2", "expires_at": 4e9, "started_at": "now"}))
    live = veclip_cli("status", str(out))
    assert (
        live.returncode == 1
        and "NOT DONE" in live.stdout
        and "1 remaining of 2" in live.stdout
        and "running (lease held by r2)" in live.stdout
    )
    assert "ETA" in live.stdout
    assert "neither a rewrite or score output" in veclip_cli("status", str(tmp_path / "sample")).stderr


def test_status_is_not_done_with_a_shard_file_gone_or_two_configurations(tmp_path):
    import json

    _rewrite_in_process(tmp_path, layout="captions")
    out = tmp_path / "out"
    (out / "part-00000.parquet").unlink()  # a lifecycle rule, a manual rm
    gone = veclip_cli("status", str(out))
    assert gone.returncode == 1 and "NOT DONE" in gone.stdout and "MISSING: 1 marked shard(s)" in gone.stdout
    marker = out / CURRENT.done / "part-00000.parquet.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "fingerprint": "another"}))
    (out / "part-00000.parquet").write_bytes((out / "part-00001.parquet").read_bytes())
    mixed = veclip_cli("status", str(out))
    assert mixed.returncode == 1 and "MIXED: 2 configurations" in mixed.stdout, mixed.stdout


def test_the_gallery_renders_in_a_real_browser(tmp_path):
    """Headless Chromium (Debian's; `make test` installs it) opens a page of `veclip show --html`:
    it renders, the inline images load (their saturated colours are on screen), not a blank page."""
    _rewrite_in_process(tmp_path, layout="captions")
    page = tmp_path / "gallery.html"
    show(ShowConfig(str(tmp_path / "out"), rows=4, html=str(page)))
    pixels = browser_screenshot(page, tmp_path / "gallery.png")
    assert pixels.std() > 20  # not blank
    saturated = (
        pixels.max(axis=2) - pixels.min(axis=2)
    ) > 90  # the page itself is black, white and pale; the scenes are not
    assert saturated.sum() > 2000, saturated.sum()


def test_the_report_page_stands_alone(tmp_path):
    """report.html: the Markdown report's tables, code and quotes as HTML, its plots inline, the gallery embedded."""
    from PIL import Image

    from veclip.world.report import to_html

    Image.new("RGB", (4, 4), (200, 0, 0)).save(tmp_path / "loss.png")
    page = to_html(
        [
            "# veclip demo report",
            "> **tiny** and `random`",
            "| stage | seconds |",
            "| --- | --- |",
            "| rewrite | 1.5 |",
            "",
            "```",
            "rewrite (both): 40 rows <in>",
            "```",
            "![loss](loss.png)",
            "@gallery.html",
            "## Evaluation\n\n| zero-shot | top-1 |\n| --- | --- |\n| label_brand | 17.8% |\n",
        ],
        tmp_path,
    )
    assert (
        "<h1>veclip demo report</h1>" in page and "<blockquote><b>tiny</b> and <code>random</code></blockquote>" in page
    )
    assert "<tr><th>stage</th><th>seconds</th></tr><tr><td>rewrite</td><td>1.5</td></tr>" in page
    assert "<pre>rewrite (both): 40 rows &lt;in&gt;</pre>" in page and 'src="data:image/png;base64,' in page
    assert '<iframe src="gallery.html"' in page
    assert "<h2>Evaluation</h2>" in page and "<td>label_brand</td><td>17.8%</td>" in page  # a multi-line item
