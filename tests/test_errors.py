"""The first errors a user meets, each one line with the cause and the fix; a traceback only with --verbose."""

from __future__ import annotations

import os

from conftest import free_port, veclip_cli

NO_AWS = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | {
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    "AWS_CONFIG_FILE": "/nonexistent",
    "AWS_EC2_METADATA_DISABLED": "true",  # never ask an instance-metadata address
}


def _one_line(result) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def _run(*args, env):
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).with_name("veclip")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300, env=env)


def test_missing_credentials(s3_endpoint):
    line = _one_line(_run("validate", "s3://bucket/data", "--s3-endpoint", s3_endpoint, env=NO_AWS))
    assert "no S3 credentials found" in line and "AWS_ACCESS_KEY_ID" in line


def test_an_unreachable_endpoint():
    closed = f"http://127.0.0.1:{free_port()}"
    env = NO_AWS | {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_MAX_ATTEMPTS": "1"}
    line = _one_line(_run("validate", "s3://bucket/data", "--s3-endpoint", closed, env=env))
    assert f"cannot reach the S3 endpoint {closed}" in line and "--s3-endpoint" in line


def test_a_missing_bucket_or_prefix(s3_bucket):
    bucket, options = s3_bucket
    flags = ["--s3-endpoint", options.endpoint_url]
    no_bucket = _one_line(veclip_cli("validate", "s3://veclip-no-such-bucket/data", *flags))
    assert "no such bucket: veclip-no-such-bucket" in no_bucket
    no_prefix = _one_line(veclip_cli("rewrite", "--input", f"{bucket}/nothing-here", "--output", f"{bucket}/o", *flags))
    assert f"no such folder: {bucket}/nothing-here" in no_prefix


def test_a_column_mapping_that_fits_no_shard(sample_root, tmp_path):
    common = ["--input", str(sample_root / "train"), "--columns", "alt_text=caption_text", "--dry-run"]
    line = _one_line(veclip_cli("rewrite", *common, "--output", str(tmp_path / "o"), "--preset", "tiny"))
    assert "alt_text=caption_text names no column" in line and "fix --columns" in line and "alt_text" in line
    line = _one_line(veclip_cli("train", *common, "--output", str(tmp_path / "r")))
    assert "alt_text=caption_text names no column" in line and "part-0000" in line


def test_a_flag_that_is_a_config_field(tmp_path):
    result = veclip_cli("train", "--input", "x", "--output", "y", "--steps", "100", "--lr=1e-4")
    line = result.stderr.strip().splitlines()[-1]  # argparse's usage, then its error line
    assert (
        result.returncode == 2
        and "--steps is a config field: use --set steps=100" in line
        and "use --set optim.lr=1e-4" in line
    )


def test_verbose_keeps_the_traceback(s3_endpoint):
    result = _run("validate", "s3://bucket/data", "--s3-endpoint", s3_endpoint, "--verbose", env=NO_AWS)
    assert result.returncode != 0 and "Traceback" in result.stderr and "NoCredentialsError" in result.stderr
