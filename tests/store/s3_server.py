"""A real S3-compatible HTTP endpoint on loopback for tests: moto's server mode, reached through s3fs.

The endpoint and the credentials reach botocore through the standard AWS environment variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``), so
nothing about them has to be passed to unipt, and nothing can end up in a store. Every other AWS setting
that could redirect the client (profiles, config files, a service-specific endpoint, instance metadata)
is cleared, and proxies are bypassed for loopback, so the tests stay offline whatever the machine has.
"""

from __future__ import annotations

import secrets
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

# Settings that would override or add to what the fixture sets (AWS_ENDPOINT_URL_S3 wins over
# AWS_ENDPOINT_URL; a profile or session token would change which credentials are used).
_CLEARED = (
    "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CA_BUNDLE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


@dataclass(frozen=True)
class S3Endpoint:
    endpoint_url: str  # http://127.0.0.1:<port>
    access_key: str
    secret_key: str
    bucket: str

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def filesystem(self):
        """A synchronous s3fs filesystem for inspecting the bucket (credentials from the environment)."""
        return _inspector(self.endpoint_url)


_INSPECTORS: dict = {}


def _inspector(endpoint_url: str):
    """One uncached (so: always this endpoint's) synchronous filesystem per server, reused by every test."""
    import s3fs

    if endpoint_url not in _INSPECTORS:
        _INSPECTORS[endpoint_url] = s3fs.S3FileSystem(skip_instance_cache=True)
    return _INSPECTORS[endpoint_url]


def _clear_s3fs_instances() -> None:
    import s3fs

    # fsspec caches filesystem instances by their arguments, not by the environment: one made for
    # another endpoint (or before this one existed) must not be handed back.
    s3fs.S3FileSystem.clear_instance_cache()


@contextmanager
def moto_s3(monkeypatch: pytest.MonkeyPatch, scratch: Path, bucket: str = "unipt-test") -> Iterator[S3Endpoint]:
    """Start moto on 127.0.0.1 (a free port), point the AWS environment at it, create ``bucket``."""
    pytest.importorskip("s3fs", reason="remote stores need the `remote` extra (s3fs)")
    server_mod = pytest.importorskip("moto.server", reason="the S3 tests need moto[server]")
    import fsspec.config

    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        assert host == "127.0.0.1", host
        endpoint = S3Endpoint(
            endpoint_url=f"http://{host}:{port}",
            # Distinctive, per-run values, so that finding them in a stored object cannot be a coincidence.
            access_key="AKIAUNIPT" + secrets.token_hex(8).upper(),
            secret_key="unipt-secret-" + secrets.token_urlsafe(24),
            bucket=bucket,
        )
        for name in _CLEARED:
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", endpoint.access_key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", endpoint.secret_key)
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint.endpoint_url)
        monkeypatch.setenv("AWS_CONFIG_FILE", str(scratch / "no-aws-config"))
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(scratch / "no-aws-credentials"))
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
        # FSSPEC_S3_* variables are read into fsspec's config at import time; drop any the machine had.
        monkeypatch.delitem(fsspec.config.conf, "s3", raising=False)
        _clear_s3fs_instances()
        # boto3 (plain botocore, same environment) rather than s3fs.mkdir, which first probes the missing
        # bucket's region with several retried requests.
        import boto3

        boto3.client("s3").create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        fs = _INSPECTORS.pop(f"http://{host}:{port}", None)
        if fs is not None and getattr(fs, "_s3creator", None) is not None:
            fs.close_session(fs.loop, fs._s3creator)  # close its HTTP session while the server is still up
        _clear_s3fs_instances()
        server.stop()
