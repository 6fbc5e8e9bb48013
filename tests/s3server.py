"""A throwaway S3-compatible server for the tests: moto's standalone server, in its own process
on loopback (its data lives in memory, so a restart empties it)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
               "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip


class MotoServer:
    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.port = port
        self.host = host
        self.endpoint = f"http://{host}:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        moto = str(Path(sys.executable).parent / "moto_server")
        argv = [moto, "-H", self.host, "-p", str(self.port)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection((self.host, self.port), timeout=1).close()
                return
            except OSError:
                assert self.proc.poll() is None, "moto_server exited"
                assert time.monotonic() < deadline, "moto_server did not start"
                time.sleep(0.1)

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def client(self) -> Any:
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="test", aws_secret_access_key="test")  # fmt: skip


def keys(s3: Any, bucket: str, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


@contextlib.contextmanager
def bucket_server(port: int, bucket: str, host: str = "127.0.0.1") -> Iterator[MotoServer]:
    """moto's S3 server with one empty bucket, stopped afterwards."""
    server = MotoServer(port, host=host)
    server.start()
    try:
        server.client().create_bucket(Bucket=bucket)
        yield server
    finally:
        if server.proc is not None:
            server.stop()
