"""The CLI as a user runs it: the installed `veclip` script in a subprocess."""

import re
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import browser_screenshot, veclip_cli


def test_sample_then_validate_then_corrupt(tmp_path):
    out = tmp_path / "data"
    done = veclip_cli(
        "sample", "--out", str(out), "--rows", "40", "--eval-rows", "10", "--shards", "2", "--image-size", "48"
    )
    assert done.returncode == 0, done.stderr
    assert "sample: 40 train + 10 eval rows" in done.stdout

    ok = veclip_cli("validate", str(out / "train"), "--images", "full")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "OK: usable (40 rows in 2 shards)" in ok.stdout

    bad = tmp_path / "corrupt"
    shutil.copytree(out / "train", bad)
    table = pq.read_table(bad / "part-00001.parquet")
    images = table.column("image").to_pylist()
    images[4] = images[4][:100]  # truncated JPEG
    pq.write_table(
        table.set_column(1, table.schema.field("image"), pa.array(images, pa.binary())), bad / "part-00001.parquet"
    )
    failed = veclip_cli("validate", str(bad), "--images", "full")
    assert failed.returncode == 1
    assert "[bad_image] part-00001.parquet row 4 (key 'train-00000024')" in failed.stdout
    assert "NOT USABLE" in failed.stdout


def test_validate_on_s3_with_endpoint_flag(sample_root, s3_bucket):
    url, options = s3_bucket
    from veclip.storage import Location

    Location(url, options).fs.put(str(sample_root / "eval") + "/", url[len("s3://") :] + "/eval", recursive=True)
    result = veclip_cli("validate", url + "/eval", "--s3-endpoint", options.endpoint_url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: usable (20 rows in 3 shards)" in result.stdout


def test_import_cli(tmp_path):
    import csv as csv_module

    from PIL import Image

    (tmp_path / "a.png").write_bytes(b"")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    with open(tmp_path / "list.csv", "w", newline="") as f:
        csv_module.writer(f).writerows([["path", "text"], ["a.png", "empty file"], ["b.png", "fine"]])
    result = veclip_cli(
        "import", str(tmp_path / "list.csv"), "--out", str(tmp_path / "out"), "--columns", "image=path,alt_text=text"
    )
    assert result.returncode == 0, result.stderr
    assert "1 rows, 1 quarantined" in result.stdout and "image_empty" in result.stdout


def test_bad_input_gives_clear_errors(tmp_path):
    missing = veclip_cli("validate", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "no such folder" in missing.stderr and "Traceback" not in missing.stderr
    mapping = veclip_cli("validate", str(tmp_path), "--columns", "picture=jpg")
    assert mapping.returncode == 2 and "unknown role 'picture'" in mapping.stderr
    rows = veclip_cli("sample", "--out", str(tmp_path / "s"), "--rows", "0")
    assert rows.returncode == 2 and "rows must be >= 1" in rows.stderr


@pytest.mark.slow
def test_demo(tmp_path, vllm_python):
    """The demo at test size: the quick trained models (built once, cached), 40 rows, 20 steps per mode."""
    result = veclip_cli(
        "demo",
        "--out",
        str(tmp_path / "demo"),
        "--rows",
        "40",
        "--steps",
        "20",
        "--models",
        "quick",
        env={"VECLIP_VLLM_PYTHON": vllm_python},
        timeout=1500,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (
        result.stdout.count("OK: usable") == 3 and "demo: done" in result.stdout
    )  # both splits, then the caption tables
    assert "caption tables" in result.stdout and "joined by key" in result.stdout
    assert "rewrite (both): 40 rows in -> " in result.stdout and "captioner: fact recall" in result.stdout
    assert (
        "train (veclip-tiny, captions alttext): step 20" in result.stdout
        and "train (veclip-tiny, captions mix): step 20" in result.stdout
    )
    assert "| AltText only | VeCLIP mix | VeCLIP mix - AltText only [95%] |" in result.stdout  # the comparison
    assert (
        "| brand probe (texts differ only in the name) |" in result.stdout
        and "| R@5, held-out style |" in result.stdout
    )
    assert (
        re.search(r"score: 40 rows in \d+ shards scored by .*models/mix", result.stdout) and "flagged" in result.stdout
    )  # the gate
    # a person reads it: the stages' own lines; Ray's, Ray Data's and vLLM's logs are in a file
    console = result.stdout + result.stderr
    built = [line for line in console.splitlines() if line.startswith("models: ")]  # a first run builds the models
    # (each eval step prints its tables: two prompt styles, two caption styles and the probe: ~18 lines)
    assert len(console.splitlines()) - len(built) <= 180 and "ray: worker and engine logs in " in result.stdout, console
    assert " pid=" not in console and "Loading safetensors" not in console, (
        console
    )  # no forwarded worker or engine lines
    for mode in ("alttext", "mix"):
        assert (tmp_path / "demo" / "models" / mode / "open_clip_model.safetensors").exists()
    assert (tmp_path / "demo" / "gallery.html").read_text().count(
        "data:image/jpeg;base64,"
    ) == 24  # captions beside their images
    page = (tmp_path / "demo" / "report.html").read_text()  # the report as one page: plots inline, the gallery embedded
    assert (
        page.count("data:image/png;base64,") == 2
        and '<iframe src="gallery.html"' in page
        and "<h2>Evaluation</h2>" in page
    )
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "Small models, trained here" in report and "| label_shape |" in report and "| label_brand |" in report
    assert "fusion keeps" in report and "LaCLIP rewrites:" in report
    assert "## Caption gate" in report and "vecap " in report.split("## Caption gate")[1]
    assert "clip_scores" in (tmp_path / "demo" / "gallery.html").read_text()  # scores and flags beside the images
    assert (tmp_path / "demo" / "loss.png").stat().st_size > 1000 and (
        tmp_path / "demo" / "eval.png"
    ).stat().st_size > 1000
    # the report opens in a real browser: plots and the embedded gallery's scenes on screen, not a blank page
    pixels = browser_screenshot(tmp_path / "demo" / "report.html", tmp_path / "report.png", size="1000,4000")
    saturated = (pixels.max(axis=2) - pixels.min(axis=2)) > 90
    assert pixels.std() > 20 and saturated.sum() > 5000, saturated.sum()


def test_secrets_are_recognised_by_their_common_names_and_inside_urls():
    from veclip.config import SECRET_NAME, redact

    for name in (
        "HF_TOKEN",
        "AWS_SECRET_ACCESS_KEY",
        "GITHUB_PAT",
        "OPENAI_KEY",
        "DATABASE_URL",
        "apiKey",
        "accessToken",
        "db_password",
        "SENTRY_DSN",
        "PGPASSWORD",
        "MYSQL_PWD",
        "APP_SECRETS",
        "SECRETKEY",
        "secret_key",
        "SLACK_WEBHOOK_URL",
    ):
        assert SECRET_NAME.search(name), name
    for name in ("prompt_tokens", "max_tokens", "sort_key", "key", "patience", "model", "tokenizer", "MAX_TOKENS"):
        assert not SECRET_NAME.search(name), name
    out = redact({"env": {"DATABASE_URL": "postgres://u:p4ss@db/x", "NOTE": "see https://bob:hunter22@example.org/x"}})
    assert out["env"]["DATABASE_URL"] == "<redacted>" and out["env"]["NOTE"] == "see https://<redacted>@example.org/x"


def test_secrets_are_recognised_by_their_shape_under_any_name():
    """A Hugging Face token, an AWS key id, a GitHub token or a PEM private key in a value called NOTE (or quoted
    by an error) is scrubbed all the same; model names, paths and captions are left alone."""
    from veclip.config import redact, scrub

    pem = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----"
    values = ["hf_" + "a1B2" * 8, "AKIA" + "ABCDEFGHIJ234567", "ghp_" + "x9" * 18, pem]
    for value in values:
        out = redact({"env": {"NOTE": f"login failed with {value}!"}})
        assert out["env"]["NOTE"] == "login failed with <redacted>!", out
    plain = "hf-hub:timm/ViT-B-16 at s3://bucket/AKIA/path, a photo of sk-8 skis"
    assert scrub(plain, ()) == plain


def test_a_urls_bare_token_is_scrubbed_like_a_password():
    """MLflow's tracking URI is often https://user:token@host or https://token@host: neither reaches a record."""
    from veclip.config import scrub

    assert scrub("https://bob:hunter22@mlflow.example/x", ()) == "https://<redacted>@mlflow.example/x"
    assert scrub("https://ghp_abc123@mlflow.example/x", ()) == "https://<redacted>@mlflow.example/x"
    assert scrub("file:///runs/mlruns and s3://bucket/key", ()) == "file:///runs/mlruns and s3://bucket/key"
