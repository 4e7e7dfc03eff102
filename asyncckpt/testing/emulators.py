"""Object-store emulators on loopback, each in its own process (so it does not share the tests' GIL): moto (S3),
gcp-storage-emulator (Google Cloud Storage) and Azurite (Azure Blob Storage)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable

KEY, SECRET, REGION = "asyncckpt-test-key", "asyncckpt-test-secret", "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(cmd: list[str], name: str, probe: Callable[[], None], timeout: float, env: dict[str, str] | None = None,
           cwd: str | None = None) -> tuple[subprocess.Popen[bytes], Any]:
    """Start ``cmd`` with its output in a file (a pipe nobody reads fills up and then blocks the server for good)
    and wait until ``probe()`` stops raising; RuntimeError with the server's last words when it does not start."""
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                            env=None if env is None else {**os.environ, **env})
    deadline = time.monotonic() + timeout
    while True:
        try:
            probe()
            return proc, log
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                log.seek(0)
                err = log.read().decode(errors="replace")[-2000:]
                log.close()
                raise RuntimeError(f"{name} did not start within {timeout:g}s: {err}") from None
            time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes], log: Any) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


def _answers(url: str) -> None:
    """Raise unless the server at ``url`` answers HTTP (an error status is an answer)."""
    try:
        urllib.request.urlopen(url, timeout=1).close()
    except urllib.error.HTTPError:
        pass


class MotoServer:
    """``python -m moto.server`` (an S3 emulator) on a free loopback port; ``stop()`` ends it. ``env`` adds to its
    environment (``INITIAL_NO_AUTH_ACTION_COUNT="0"``: it checks credentials, as S3 does)."""

    def __init__(self, timeout: float = 30.0, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc, self._log = _serve([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                      "moto server", lambda: urllib.request.urlopen(self.url + "/moto-api/",
                                                                                    timeout=1).close(),
                                      timeout, env)

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
        _stop(self.proc, self._log)


class GCSEmulator:
    """``gcp-storage-emulator`` (a Google Cloud Storage emulator, in memory) on a free loopback port. gcsfs should be
    imported with ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` in the environment: otherwise it probes each bucket
    over gRPC, which the emulator does not answer, for 60 s."""

    def __init__(self, timeout: float = 30.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc, self._log = _serve([sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
                                       "--port", str(self.port), "--in-memory", "--quiet"],
                                      "gcp-storage-emulator", lambda: _answers(self.url + "/storage/v1/b"), timeout)

    def options(self, endpoint: str | None = None) -> dict[str, Any]:
        """storage_options for gcsfs: the emulator's endpoint, no credentials."""
        return {"endpoint_url": endpoint or self.url, "token": "anon", "project": "asyncckpt-test"}

    def _json(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json") -> Any:
        import json

        req = urllib.request.Request(self.url + path, method=method, data=body, headers={"Content-Type": content_type})
        with urllib.request.urlopen(req, timeout=30) as reply:
            data = reply.read()
        return json.loads(data) if data else None

    def create_bucket(self, name: str) -> None:
        import json

        self._json("POST", "/storage/v1/b?project=asyncckpt-test", json.dumps({"name": name}).encode())

    def names(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object name under ``prefix`` (listed over the JSON API, independently of gcsfs)."""
        query = urllib.parse.urlencode({"prefix": prefix})
        return sorted(o["name"] for o in self._json("GET", f"/storage/v1/b/{bucket}/o?{query}").get("items", []))

    def put(self, bucket: str, name: str, data: bytes) -> None:
        query = urllib.parse.urlencode({"uploadType": "media", "name": name})
        self._json("POST", f"/upload/storage/v1/b/{bucket}/o?{query}", data, "application/octet-stream")

    def get(self, bucket: str, name: str) -> bytes:
        quoted = urllib.parse.quote(name, safe="")
        with urllib.request.urlopen(f"{self.url}/download/storage/v1/b/{bucket}/o/{quoted}?alt=media",
                                    timeout=30) as reply:
            return reply.read()

    def stop(self) -> None:
        _stop(self.proc, self._log)


AZURITE_VERSION = "3.37.0"
#: Azurite's well-known development account (public, the same in every Azurite)
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def azurite_install(cache: Path | None = None) -> Path:
    """The ``azurite-blob`` launcher, installed with npm (once) into ``cache`` (default
    ``$ASYNCCKPT_CACHE`` or ``~/.cache/asyncckpt``, ``azurite-<version>`` in it); RuntimeError when it cannot be."""
    root = Path(cache or os.environ.get("ASYNCCKPT_CACHE") or Path.home() / ".cache" / "asyncckpt")
    home = root / f"azurite-{AZURITE_VERSION}"
    launcher = home / "node_modules" / ".bin" / "azurite-blob"
    if launcher.exists():
        return launcher
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        raise RuntimeError("Azurite needs node and npm on PATH (apt-get install nodejs npm)")
    home.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--silent", "--prefix", str(home),
                           f"azurite@{AZURITE_VERSION}"], capture_output=True, timeout=600)
    if done.returncode != 0 or not launcher.exists():
        raise RuntimeError(f"npm install azurite@{AZURITE_VERSION} failed: "
                           f"{(done.stderr or done.stdout).decode(errors='replace')[-2000:]}")
    return launcher


class Azurite:
    """Azurite's blob service (the Azure Storage emulator, installed with npm on first use) in memory on a free
    loopback port."""

    def __init__(self, timeout: float = 60.0, cache: Path | None = None) -> None:
        launcher = azurite_install(cache)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/{AZURITE_ACCOUNT}"
        self.proc, self._log = _serve([str(launcher), "--blobHost", "127.0.0.1", "--blobPort", str(self.port),
                                       "--inMemoryPersistence", "--silent",
                                       "--skipApiVersionCheck", "--disableTelemetry", "--loose"],
                                      "Azurite", lambda: _answers(self.url + "?comp=list"), timeout)

    def connection_string(self, endpoint: str | None = None) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
                f"BlobEndpoint={endpoint or self.url};")

    def options(self, endpoint: str | None = None) -> dict[str, Any]:
        """storage_options for adlfs: the development account's connection string."""
        return {"connection_string": self.connection_string(endpoint)}

    def client(self) -> Any:
        """A synchronous BlobServiceClient of the emulator, to inspect containers independently of the code under
        test."""
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(self.connection_string())

    def stop(self) -> None:
        _stop(self.proc, self._log)
