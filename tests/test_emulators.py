"""The loopback emulators the suite (and users, through asyncckpt.testing) run stay responsive however long used."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from asyncckpt.testing.emulators import Azurite, MotoServer


def test_the_moto_server_keeps_answering_after_its_log_outgrows_a_pipe():
    server = MotoServer()
    try:
        long = "x" * 4000  # each request logs its path: 40 of them are more than a pipe holds
        for _ in range(40):
            try:
                urllib.request.urlopen(f"{server.url}/no-such-bucket/{long}", timeout=20).close()
            except urllib.error.HTTPError:
                pass  # a 404 is an answer
        urllib.request.urlopen(server.url + "/moto-api/", timeout=20).close()
    finally:
        server.stop()


def test_azurite_that_cannot_be_installed_is_an_error_that_says_why(tmp_path, monkeypatch):
    """The Azure tests fail (never skip) where Azurite cannot start: no npm here, a fresh cache."""
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="Azurite needs node and npm on PATH"):
        Azurite(cache=tmp_path / "cache")
