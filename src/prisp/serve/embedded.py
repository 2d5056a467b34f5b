"""The real server (FastAPI app under uvicorn) in a thread of this process, on 127.0.0.1 and a free port.

For tests, benchmarks and notebooks that want to talk HTTP to ``prisp serve`` without a second process:
the same app ``prisp serve`` runs, so what is measured or tested is what is deployed.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import httpx

from prisp.errors import PrispError
from prisp.serve.app import create_app
from prisp.serve.config import ServeConfig
from prisp.serve.keys import StoreKey


@dataclass
class EmbeddedServer:
    """A running server; ``service`` is the app's state (the store, the engine) for direct inspection."""

    url: str
    server: object  # uvicorn.Server
    thread: threading.Thread
    service: object  # prisp.serve.service.PrispService

    def client(self, timeout: float = 60) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def stop(self, timeout: float = 120) -> None:
        """Shut down gracefully (lifespan shutdown closes the store) and wait for the thread."""
        self.server.should_exit = True
        self.thread.join(timeout=timeout)

    def __enter__(self) -> EmbeddedServer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def serve_in_thread(config: ServeConfig, key: StoreKey, loaded=None, start_timeout: float = 60) -> EmbeddedServer:
    """Start the app for ``config`` in a daemon thread and return once it accepts connections.

    Args:
        config: the server's options (store, anchors, model, limits).
        key: the store key.
        loaded: an already loaded base model (``prisp.models.LoadedModel``) to share; loaded from
            ``config.model`` otherwise.
        start_timeout: seconds to wait for uvicorn's startup (model and anchor loading included).

    Raises:
        PrispError: the server did not start in time, or its thread died (the log says why).
    """
    import uvicorn

    app = create_app(config, key, loaded)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # loopback only, a free port
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="prisp-serve")
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise PrispError("the embedded server did not start (see the log above)")
        time.sleep(0.02)
    return EmbeddedServer(f"http://127.0.0.1:{sock.getsockname()[1]}", server, thread, app.state.service)


def wait_for_job(client: httpx.Client, job_id: str, headers: dict, timeout: float = 120) -> dict:
    """Poll ``GET /v1/jobs/{job_id}`` until the job succeeded or failed; its final state.

    Raises:
        TimeoutError: still queued or running after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        state = client.get(f"/v1/jobs/{job_id}", headers=headers).raise_for_status().json()
        if state["status"] in ("succeeded", "failed"):
            return state
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} is still {state['status']} after {timeout:.0f} s")
        time.sleep(0.05)
