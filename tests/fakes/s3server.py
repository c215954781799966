"""A real S3-protocol server for the tests: moto in server mode, as a subprocess.

boto3 talks plain HTTP to it, in the test process and in the worker processes alike,
so the store code runs exactly as it would against S3 (no patched client, no moto
decorator that only the test process would see).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

#: Dummy credentials and region: moto accepts any, botocore refuses to sign without.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # Never wander off to an instance metadata endpoint or a developer's profile.
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


class MotoServer:
    """``python -m moto.server`` on 127.0.0.1:``port``; ``endpoint_url`` once it answers."""

    def __init__(self, port: int, log: Path):
        self.port = port
        self.log = log
        self.endpoint_url = f"http://127.0.0.1:{port}"
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **AWS_ENV})

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint_url + "/", timeout=1) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}:\n"
                                   f"{self.log.read_text(errors='replace')}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"moto server on port {self.port} did not answer in "
                                   f"{timeout}s:\n{self.log.read_text(errors='replace')}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def empty_bucket(client, bucket: str) -> None:
    """Delete every object of ``bucket`` and the bucket itself."""
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket):
        objects = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if objects:
            client.delete_objects(Bucket=bucket, Delete={"Objects": objects})
    client.delete_bucket(Bucket=bucket)
