"""``prisp serve`` as a child process on 127.0.0.1, for the kill tests and the reliability benchmark: start it
(optionally armed with a crash point, ``prisp.faults``), talk HTTP to it, SIGKILL it, start it again."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from prisp.faults import FAULT_ENV
from prisp.serve.auth import ADMIN_ENV
from prisp.serve.keys import KEY_ENV, StoreKey


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """One store served by successive server processes (each start is a new process on a new port).

    Args:
        store: the store directory.
        model: base model name or directory.
        anchors: ``task -> anchor directory``.
        key: the store key (passed in the environment, as an operator would).
        admin_token: the admin token (``$PRISP_ADMIN_TOKEN``).
        log: file the processes' output is appended to.
        extra_args: more ``prisp serve`` options.
    """

    def __init__(self, store: Path, model: str, anchors: dict[str, Path], key: StoreKey, admin_token: str,
                 log: Path, extra_args: tuple[str, ...] = ()):
        self.store, self.model, self.anchors, self.key = Path(store), model, anchors, key
        self.admin_token, self.log, self.extra_args = admin_token, Path(log), extra_args
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def env(self, fault: str | None = None, key: StoreKey | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in (FAULT_ENV, KEY_ENV)}
        env.update({KEY_ENV: (key or self.key).encode(), ADMIN_ENV: self.admin_token,
                    "PRISP_THREADS": env.get("PRISP_THREADS", "1")})
        if fault:
            env[FAULT_ENV] = fault
        return env

    def start(self, fault: str | None = None, key: StoreKey | None = None, timeout: float = 300,
              previous_key_file: Path | None = None) -> bool:
        """Start a server (armed with ``fault``); True once healthy, False if it exited first (see the log)."""
        port = free_port()
        args = [sys.executable, "-m", "prisp", "serve", "--store", str(self.store), "--model", self.model,
                "--port", str(port), "--threads", "1", *self.extra_args]
        if previous_key_file is not None:
            args += ["--previous-key-file", str(previous_key_file)]
        for task, path in self.anchors.items():
            args += ["--anchor", f"{task}={path}"]
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("a") as out:
            self.proc = subprocess.Popen(args, env=self.env(fault, key), stdout=out, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.kill()
        raise TimeoutError(f"the server did not become healthy in {timeout:.0f} s (log: {self.log})")

    def wait_dead(self, timeout: float = 120) -> bool:
        """Whether the process exited (e.g. at its crash point) within ``timeout``."""
        try:
            self.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs, as in a power cut."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(60)

    def stop(self) -> None:
        """A clean stop (SIGINT: uvicorn's graceful shutdown)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.kill()

    def client(self, timeout: float = 120) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    def rotate(self, new_key: StoreKey, key_dir: Path, fault: str | None = None) -> subprocess.CompletedProcess:
        """Run ``prisp serve rotate-key`` (armed with ``fault``) as its own process; the server must be stopped."""
        key_dir.mkdir(parents=True, exist_ok=True)
        old_file, new_file = key_dir / "old.key", key_dir / "new.key"
        for path, key in ((old_file, self.key), (new_file, new_key)):
            path.write_text(key.encode())
            path.chmod(0o600)
        args = [sys.executable, "-m", "prisp", "serve", "rotate-key", "--store", str(self.store),
                "--old-key-file", str(old_file), "--new-key-file", str(new_file)]
        return subprocess.run(args, env=self.env(fault), capture_output=True, text=True, timeout=300)
