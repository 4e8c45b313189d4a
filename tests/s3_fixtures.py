"""Loopback S3 for tests: a real moto HTTP server on 127.0.0.1 (one per session), an AWS environment per test
that can reach nothing else, fresh buckets, and a TCP proxy that can make the endpoint vanish mid-transfer.

Nothing is mocked in-process: the code under test talks real boto3 over HTTP to the server.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

__all__ = [
    "ACCESS_KEY",
    "REGION",
    "SECRET_KEY",
    "CuttableProxy",
    "make_run_folder",
    "s3_bucket",
    "s3_client",
    "s3_env",
    "s3_server",
    "use_endpoint",
]

ACCESS_KEY = "AKIAFINETUNETESTKEY1"
SECRET_KEY = "finetune-test-secret-Zq9xV3mWp7"
REGION = "us-east-1"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Endpoint URL of a moto S3 server bound to 127.0.0.1 on a free port."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def use_endpoint(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """Point every AWS client at `endpoint` with dummy credentials; no profile, config file, instance metadata
    or proxy can send traffic anywhere else. Failures fail fast (2 attempts, 2 s connect timeout)."""
    for name in list(os.environ):
        if name.startswith("AWS_") or name.lower() in {"http_proxy", "https_proxy", "all_proxy"}:
            monkeypatch.delenv(name)
    missing = str(Path("/nonexistent/finetune-tests/aws"))
    for name, value in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_CONFIG_FILE": f"{missing}/config",
        "AWS_SHARED_CREDENTIALS_FILE": f"{missing}/credentials",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_MAX_ATTEMPTS": "2",
        "FINETUNE_S3_CONNECT_TIMEOUT": "2",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def s3_env(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The loopback endpoint, with the AWS environment pointed at it."""
    use_endpoint(monkeypatch, s3_server)
    return s3_server


@pytest.fixture
def s3_client(s3_env: str) -> Any:
    """A plain boto3 client on the loopback server, for setting up and inspecting buckets."""
    return boto3.client("s3", endpoint_url=s3_env, region_name=REGION, aws_access_key_id=ACCESS_KEY,
                        aws_secret_access_key=SECRET_KEY)


@pytest.fixture
def s3_bucket(s3_client: Any) -> str:
    """A new, empty bucket (moto keeps state for the whole session, so each test gets its own)."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    return name


class CuttableProxy:
    """TCP proxy on 127.0.0.1 in front of `upstream` ("http://127.0.0.1:PORT"). Once `cut_after` bytes have
    gone upstream (or on `cut()`), it resets every connection and stops listening: the endpoint is gone."""

    def __init__(self, upstream: str, cut_after: int | None = None) -> None:
        self._upstream = ("127.0.0.1", int(upstream.rsplit(":", 1)[1]))
        self._cut_after = cut_after
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.sent = 0
        self.is_cut = False
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.is_cut:
            try:
                downstream, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(self._upstream)
            with self._lock:
                if self.is_cut:
                    downstream.close()
                    upstream.close()
                    return
                self._sockets += [downstream, upstream]
            threading.Thread(target=self._pump, args=(downstream, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, downstream, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        try:
            while data := src.recv(65536):
                if counted:
                    with self._lock:
                        self.sent += len(data)
                        over = self._cut_after is not None and self.sent > self._cut_after
                    if over:
                        self.cut()
                        return
                dst.sendall(data)
        except OSError:
            pass  # the other side (or cut()) closed the connection
        for sock in (src, dst):
            _close(sock)

    def cut(self) -> None:
        with self._lock:
            self.is_cut = True
            sockets, self._sockets = self._sockets, []
        _close(self._listener)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST on close
            _close(sock)


def _close(sock: socket.socket) -> None:
    """Shut down (which also wakes a thread blocked in recv on it), then close."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


def make_run_folder(root: Path, run_id: str = "run-1", *, adapter_bytes: int = 4096) -> Path:
    """A fake run folder with the real layout (manifest not written)."""
    run = root / run_id
    files: dict[str, bytes] = {
        "config.yaml": b"model:\n  name: tiny\noutput:\n  run_id: " + run_id.encode() + b"\n",
        "data/train.jsonl": b'{"sql_prompt": "q", "sql": "SELECT 1"}\n' * 20,
        "adapter/adapter_config.json": json.dumps({"r": 8}).encode(),
        "adapter/adapter_model.safetensors": bytes(range(256)) * (adapter_bytes // 256) + b"x",
        "checkpoints/checkpoint-2/trainer_state.json": json.dumps({"global_step": 2}).encode(),
        "logs/train_log.jsonl": b'{"step": 1, "loss": 2.0}\n',
        "eval/metrics.json": json.dumps({"execution_accuracy": 0.5}).encode(),
        "eval/report.md": b"# report\n",
    }
    for rel, data in files.items():
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_bytes(data)
    return run
