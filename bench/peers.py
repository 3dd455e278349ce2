"""Start and stop the servers under comparison on loopback, each on a free port.

Each server runs in its own process group (so its children go with it) and writes its output to
a log file. ``start_*`` returns when the server answers, or raises with the log's tail.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

BENCH_DIR = Path(__file__).resolve().parent
PEERS_DIR = BENCH_DIR / ".peers"
LLAMA_VENV = PEERS_DIR / "llama-venv"


class PeerUnavailable(RuntimeError):
    """The peer can't run here (missing package); the comparison skips it and says why."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Peer:
    name: str
    base_url: str
    model: str  # the `model` field requests send
    proc: subprocess.Popen[bytes]
    log_path: Path
    extra_body: dict[str, Any] = field(default_factory=dict)
    usage: bool = True  # the server understands stream_options.include_usage
    stop_signal: int = signal.SIGTERM

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def pids(self) -> list[int]:
        """The server's process and all its descendants."""
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            return [root.pid, *(c.pid for c in root.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    def child_pid(self, marker: str) -> int | None:
        """The first descendant whose command line holds ``marker`` (e.g. ``"tokenrelay.cli worker"``)."""
        import psutil

        for pid in self.pids()[1:]:
            try:
                if marker in " ".join(psutil.Process(pid).cmdline()):
                    return pid
            except psutil.NoSuchProcess:
                continue
        return None

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(self.stop_signal)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        # Whatever is left of the group this module started (a worker, a redis-server).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _spawn(
    name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], Path]:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as log:
        log.write((" ".join(argv) + "\n").encode())
        log.flush()
        # A shell's background job starts with SIGINT ignored, and children inherit that: give the
        # server its default SIGINT back (``tokenrelay up`` stops cleanly on it).
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
            preexec_fn=_default_sigint,
            cwd=BENCH_DIR.parent,
        )
    return proc, log_path


def _wait(peer: Peer, timeout: float, ready_line: str | None = None) -> Peer:
    """Until GET /models answers 200 (and ``ready_line`` is in the log, when given)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if peer.proc.poll() is not None:
            raise RuntimeError(f"{peer.name} exited with status {peer.proc.returncode}:\n{peer.log_tail()}")
        log_ok = ready_line is None or ready_line in peer.log_path.read_text(errors="replace")
        if log_ok:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(peer.base_url + "/models", timeout=2.0).status_code == 200:
                    return peer
        time.sleep(0.5)
    peer.stop()
    raise RuntimeError(f"{peer.name} did not answer within {timeout:.0f}s:\n{peer.log_tail()}")


def start_tokenrelay(
    model_dir: str,
    served_name: str,
    log_dir: Path,
    *,
    max_batch_size: int = 64,
    dtype: str = "float32",
    timeout: float = 300.0,
    extra_args: list[str] | None = None,
) -> Peer:
    """``tokenrelay up`` with its own Redis: REDIS_URL names a free port, so ``up`` starts one there."""
    port = free_port()
    env = {"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "PYTHONUNBUFFERED": "1"}
    argv = [
        sys.executable,
        "-m",
        "tokenrelay.cli",
        "up",
        "--model",
        model_dir,
        "--served-model-name",
        served_name,
        "--port",
        str(port),
        "--max-batch-size",
        str(max_batch_size),
        "--dtype",
        dtype,
        *(extra_args or []),
    ]
    proc, log = _spawn("tokenrelay", argv, log_dir, env)
    # SIGINT: `up` stops its gateway, workers and redis in its `finally`.
    peer = Peer(
        "tokenrelay",
        f"http://127.0.0.1:{port}/v1",
        served_name,
        proc,
        log,
        extra_body={"ignore_eos": True},
        stop_signal=signal.SIGINT,
    )
    return _wait(peer, timeout, ready_line="tokenrelay: ready")


def transformers_cli() -> str:
    exe = Path(sys.executable).parent / "transformers"
    if exe.exists():
        return str(exe)
    found = shutil.which("transformers")
    if found is None:
        raise PeerUnavailable("the `transformers` CLI is not installed")
    return found


def start_transformers_serve(model_dir: str, log_dir: Path, *, dtype: str = "float32", timeout: float = 300.0) -> Peer:
    """``transformers serve --continuous-batching`` with the saved model folder preloaded."""
    if importlib.util.find_spec("fastapi") is None:
        raise PeerUnavailable("transformers serve needs its extras: pip install 'transformers[serving]'")
    port = free_port()
    argv = [
        transformers_cli(),
        "serve",
        model_dir,
        "--continuous-batching",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--dtype",
        dtype,
        "--log-level",
        "warning",
    ]
    proc, log = _spawn("transformers-serve", argv, log_dir, {"PYTHONUNBUFFERED": "1"})
    # It refuses unknown body fields (422), so no ignore_eos/min_tokens: tokens are counted.
    peer = Peer("transformers serve --continuous-batching", f"http://127.0.0.1:{port}/v1", model_dir, proc, log)
    return _wait(peer, timeout)


def llama_cpp_python() -> str:
    """The interpreter that can import llama_cpp: this one, or the cached venv under bench/.peers/."""
    if importlib.util.find_spec("llama_cpp") is not None:
        return sys.executable
    candidate = LLAMA_VENV / "bin" / "python"
    if candidate.exists():
        probe = subprocess.run([str(candidate), "-c", "import llama_cpp.server"], capture_output=True)
        if probe.returncode == 0:
            return str(candidate)
    raise PeerUnavailable(
        "llama_cpp is not importable (pip install 'llama-cpp-python[server]' builds llama.cpp from source, "
        f"~7 min on 2 cores; bench/README.md shows how to build it into {LLAMA_VENV})"
    )


def start_llama_cpp(
    gguf_file: str, served_name: str, log_dir: Path, *, threads: int | None = None, timeout: float = 180.0
) -> Peer:
    """llama-cpp-python's server on the GGUF file, not interrupting running requests."""
    python = llama_cpp_python()
    port = free_port()
    n = str(threads or os.cpu_count() or 1)
    argv = [
        python,
        "-m",
        "llama_cpp.server",
        "--model",
        gguf_file,
        "--model_alias",
        served_name,
        "--n_ctx",
        "4096",
        "--interrupt_requests",
        "false",
        "--n_threads",
        n,
        "--n_threads_batch",
        n,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    proc, log = _spawn("llama-cpp-python", argv, log_dir)
    # Unknown fields are ignored, so EOS can end a reply early: tokens are counted from usage.
    peer = Peer(
        "llama-cpp-python server",
        f"http://127.0.0.1:{port}/v1",
        served_name,
        proc,
        log,
        extra_body={"ignore_eos": True, "min_tokens": 0},
    )
    return _wait(peer, timeout)
