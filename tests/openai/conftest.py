"""Starts a real `mlx-serving up` (embedded NATS, dispatcher, worker with the MLX
runtime on the tiny model, gateway) for the openai client to talk to."""

from __future__ import annotations

import os
import queue
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_binary(out: Path) -> Path:
    binary = out / "mlx-serving"
    subprocess.run(["go", "build", "-o", str(binary), "./cmd/mlx-serving"], cwd=REPO, check=True)
    return binary


class Up:
    # The one browser origin the session's gateway allows (CORS).
    cors_origin = "https://app.example.com"

    def __init__(self, binary: Path, data_dir: Path, extra: list[str], env: dict[str, str] | None = None):
        self.binary = binary
        self.http = f"127.0.0.1:{free_port()}"
        self.nats = f"127.0.0.1:{free_port()}"
        self.log = open(data_dir / "up.log", "w")  # noqa: SIM115 — open for the life of the process
        tiny = os.environ.get("MLX_SERVING_TINY_MODEL")
        template = Path(tiny or ".") / "chat_template.jinja"
        if tiny and (not template.exists() or "tool_call" not in template.read_text()):
            tiny = None  # written before its template learned tools: up writes a fresh one
        args = [str(binary), "up", "--data-dir", str(data_dir), "--http-addr", self.http, "--nats-listen", self.nats]
        if tiny:
            args += ["--model", tiny]
        self.model = Path(tiny).name if tiny else "tiny"
        self.proc = subprocess.Popen(args + extra, cwd=REPO, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env={**os.environ, **(env or {})})
        # stdout is read on a thread for the life of the process: the wait for the
        # banner has a deadline even while up prints nothing, and later output never
        # fills the pipe.
        self.stdout: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True, name="up stdout").start()
        try:
            self._wait_up(data_dir, timeout=240)
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            self.log.close()
            raise

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.stdout.put(line)
        self.stdout.put(None)  # EOF

    def _wait_up(self, data_dir: Path, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self.stdout.get(timeout=max(left, 0))
            except queue.Empty:
                pytest.fail(f"up printed no 'mlx-serving is up' within {timeout:.0f}s — see {data_dir / 'up.log'}")
            if line is None:
                pytest.fail(f"up exited ({self.proc.wait()}) before it was up — see {data_dir / 'up.log'}")
            if "mlx-serving is up" in line:
                return

    @property
    def base_url(self) -> str:
        return f"http://{self.http}/v1"

    @property
    def nats_url(self) -> str:
        return f"nats://{self.nats}"

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=60)
        finally:
            self.log.close()


@pytest.fixture(scope="session")
def binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not shutil.which("go"):
        pytest.fail("go is needed to build mlx-serving")
    return build_binary(tmp_path_factory.mktemp("bin"))


@pytest.fixture(scope="session")
def up(binary: Path) -> Up:
    data = Path(tempfile.mkdtemp(prefix="mlx-up-"))
    u = Up(binary, data, ["--cors-origins", Up.cors_origin])
    yield u
    assert u.stop() == 0, "up did not stop cleanly on SIGTERM"
    shutil.rmtree(data, ignore_errors=True)
