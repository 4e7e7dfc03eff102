"""Object-store emulators on loopback, each in its own process (so it does not share the tests' GIL)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

KEY, SECRET, REGION = "asyncckpt-test-key", "asyncckpt-test-secret", "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """``python -m moto.server`` (an S3 emulator) on a free loopback port; ``stop()`` ends it. ``env`` adds to its
    environment (``INITIAL_NO_AUTH_ACTION_COUNT="0"``: it checks credentials, as S3 does)."""

    def __init__(self, timeout: float = 30.0, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # its request log goes to a file: a pipe nobody reads fills up (64 KiB) and then blocks the server for good
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=self._log,
                                     env=None if env is None else {**os.environ, **env})
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(self.url + "/moto-api/", timeout=1).close()
                return
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.proc.kill()
                    self._log.seek(0)
                    err = self._log.read().decode(errors="replace")[-2000:]
                    raise RuntimeError(f"moto server did not start: {err}") from None
                time.sleep(0.05)

    def options(self, endpoint: str | None = None) -> dict[str, Any]:
        """storage_options for s3fs with dummy credentials."""
        return {"key": KEY, "secret": SECRET, "endpoint_url": endpoint or self.url,
                "client_kwargs": {"region_name": REGION}}

    def client(self) -> Any:
        """A boto3 client of the emulator, to inspect buckets independently of the code under test."""
        import boto3

        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                            region_name=REGION)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
