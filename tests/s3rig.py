"""The real S3 server of the tests: the Ceph RADOS Gateway that scripts/start-s3.sh starts.

Its environment (AWS_* variables and the test bucket) is in ENV_FILE.  Tests that need
it skip when it is not running on a developer machine and FAIL under CI=true.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator

import pytest

ENV_FILE = "/run/backupkit-test-s3/env"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def gateway_env() -> dict[str, str]:
    """The gateway's environment; skips (fails under CI) when it is not running."""
    why = ""
    env: dict[str, str] = {}
    try:
        with open(ENV_FILE) as f:
            for line in f:
                k, sep, v = line.strip().partition("=")
                if sep:
                    env[k] = v
    except OSError as e:
        why = f"{ENV_FILE}: {e.strerror} (run scripts/start-s3.sh)"
    if not why:
        import boto3
        import botocore.config
        import botocore.exceptions

        client = boto3.client(
            "s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], region_name=env["AWS_DEFAULT_REGION"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            config=botocore.config.Config(connect_timeout=3, read_timeout=10,
                                          retries={"max_attempts": 1}))
        try:
            client.head_bucket(Bucket=env["BACKUPKIT_TEST_S3_BUCKET"])
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            why = f"the test gateway does not answer: {e} (run scripts/start-s3.sh)"
    if why:
        if IN_CI:
            pytest.fail(f"the S3 gateway is required in CI: {why}", pytrace=False)
        pytest.skip(why)
    return env


@contextlib.contextmanager
def s3_location(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """s3://BUCKET/PREFIX of a fresh prefix, with the AWS_* environment set (also for
    child processes); everything under it is deleted afterwards."""
    env = gateway_env()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    url = f"s3://{env['BACKUPKIT_TEST_S3_BUCKET']}/test-{secrets.token_hex(6)}"
    try:
        yield url
    finally:
        from backupkit.repo.url import open_storage

        st = open_storage(url)
        keys = [st.prefix + "/" + info.key for info in st.list("")]  # type: ignore[attr-defined]
        client = st._client  # type: ignore[attr-defined]
        for i in range(0, len(keys), 1000):  # one request per 1,000 keys
            client.delete_objects(Bucket=env["BACKUPKIT_TEST_S3_BUCKET"], Delete={
                "Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})
