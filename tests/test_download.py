"""The LaMP downloader against a real HTTP server on 127.0.0.1 that supports Range requests."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from prisp.data import download as dl
from prisp.data.download import FileSpec, download_file, download_lamp, lamp_files, read_sums
from prisp.errors import DataError, DownloadError

QUESTIONS = [
    {"id": "1", "input": "Generate a headline for the following article: The council approved the budget.",
     "profile": [{"id": "11", "text": "Rates rise again.", "title": "Bank moves"},
                 {"id": "12", "text": "Team wins the cup.", "title": "Cup glory"}]},
    {"id": "2", "input": "Generate a headline for the following article: Snow closes schools.",
     "profile": [{"id": "21", "text": "Storm hits coast.", "title": "Storm warning"}]},
]
OUTPUTS = {"task": "LaMP_4", "golds": [{"id": "1", "output": "Budget passes"}, {"id": "2", "output": "Snow day"}]}
TIMEOUT = 5.0


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header) per GET
        self.cut_after: dict[str, int] = {}  # path -> bytes to send before dropping the connection, once
        self.ignore_range = False

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        srv = self.server
        range_header = self.headers.get("Range")
        srv.requests.append((self.path, range_header))
        file = srv.root / self.path.lstrip("/")
        if not file.is_file():
            self.send_error(404)
            return
        body = file.read_bytes()
        start = 0
        if range_header and not srv.ignore_range:
            start = int(range_header.removeprefix("bytes=").rstrip("-"))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        cut = srv.cut_after.pop(self.path, None)
        # Promising the full Content-Length and then closing mimics a connection dropped mid-transfer.
        self.wfile.write(payload if cut is None else payload[:cut])


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    """A proxy from the environment must not intercept requests to the local test server."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.delenv(dl.BASE_URL_ENV, raising=False)


def _write_json(path: Path, data) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = json.dumps(data, indent=1).encode()
    path.write_bytes(raw)
    return raw


@pytest.fixture
def served(tmp_path):
    """LaMP-4 train/dev/test files in the official layout, served over HTTP; yields (server, files)."""
    root = tmp_path / "server"
    files = {}
    for split in ("train", "dev"):
        files[f"{split}_questions.json"] = _write_json(root / f"LaMP_4/{split}/{split}_questions.json", QUESTIONS)
        files[f"{split}_outputs.json"] = _write_json(root / f"LaMP_4/{split}/{split}_outputs.json", OUTPUTS)
    files["test_questions.json"] = _write_json(root / "LaMP_4/test/test_questions.json", QUESTIONS[:1])
    server = _Server(root)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server, files
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=2)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _get(server, **kwargs):
    return download_lamp("LaMP-4", kwargs.pop("dest"), base_url=server.base_url, progress=False,
                         timeout=TIMEOUT, **kwargs)


def test_lamp_files_official_layout(monkeypatch):
    files = lamp_files("lamp_2", splits=("train", "test"), base_url="https://mirror.example/LaMP/")
    assert [f.url for f in files] == [
        "https://mirror.example/LaMP/LaMP_2/new/train/train_questions.json",
        "https://mirror.example/LaMP/LaMP_2/new/train/train_outputs.json",
        "https://mirror.example/LaMP/LaMP_2/new/test/test_questions.json",
    ]
    assert [f.dest for f in files] == ["LaMP-2/train_questions.json", "LaMP-2/train_outputs.json",
                                       "LaMP-2/test_questions.json"]
    news = lamp_files("LaMP-2N", splits="dev")
    assert news[0].url == f"{dl.DEFAULT_BASE_URL}/LaMP_2/dev/dev_questions.json"
    assert news[0].dest == "LaMP-2N/dev_questions.json"
    monkeypatch.setenv(dl.BASE_URL_ENV, "http://127.0.0.1:9/mirror")
    assert lamp_files("LaMP-4", ["dev"])[1].url == "http://127.0.0.1:9/mirror/LaMP_4/dev/dev_outputs.json"
    monkeypatch.setitem(dl.PINNED_SHA256, "LaMP_4/dev/dev_outputs.json", "a" * 64)
    assert [f.sha256 for f in lamp_files("LaMP-4", ["dev"])] == [None, "a" * 64]
    with pytest.raises(DownloadError, match="unknown split 'valid'"):
        lamp_files("LaMP-4", ["valid"])
    with pytest.raises(DataError):
        lamp_files("LaMP-9")


def test_success_writes_files_and_sums(served, tmp_path):
    server, files = served
    dest = tmp_path / "data"
    seen = []
    results = _get(server, dest=dest, splits=("train", "dev", "test"), on_result=seen.append)
    assert seen == results
    assert [r.status for r in results] == ["downloaded"] * 5
    task_dir = dest / "LaMP-4"
    for name, raw in files.items():
        assert (task_dir / name).read_bytes() == raw
    assert sorted(p.name for p in task_dir.iterdir()) == sorted([*files, "SHA256SUMS"])
    assert read_sums(task_dir / "SHA256SUMS") == {name: _sha(raw) for name, raw in files.items()}
    lines = (task_dir / "SHA256SUMS").read_text().splitlines()
    assert lines[0] == f"{_sha(files['dev_outputs.json'])}  dev_outputs.json"  # sha256sum format, sorted
    assert results[0].size == len(files["train_questions.json"])
    assert results[0].describe().startswith("downloaded LaMP-4/train_questions.json")


def test_env_var_overrides_base_url(served, tmp_path, monkeypatch):
    server, files = served
    monkeypatch.setenv(dl.BASE_URL_ENV, server.base_url + "/")
    results = download_lamp("LaMP-4", tmp_path, splits=["dev"], progress=False, timeout=TIMEOUT)
    assert [r.path.name for r in results] == ["dev_questions.json", "dev_outputs.json"]
    assert server.requests[0][0] == "/LaMP_4/dev/dev_questions.json"


def test_resume_after_interrupted_transfer(served, tmp_path):
    server, files = served
    raw = files["dev_questions.json"]
    half = len(raw) // 2
    server.cut_after["/LaMP_4/dev/dev_questions.json"] = half
    dest = tmp_path / "data"
    with pytest.raises(DownloadError, match=f"stopped at {half} of {len(raw)} bytes") as err:
        _get(server, dest=dest, splits=["dev"])
    assert "\n" not in str(err.value)
    final = dest / "LaMP-4" / "dev_questions.json"
    part = final.with_name("dev_questions.json.part")
    assert not final.exists()
    assert part.read_bytes() == raw[:half]

    results = _get(server, dest=dest, splits=["dev"])
    assert server.requests[-2] == ("/LaMP_4/dev/dev_questions.json", f"bytes={half}-")
    assert [r.status for r in results] == ["resumed", "downloaded"]
    assert final.read_bytes() == raw
    assert not part.exists()
    assert results[0].sha256 == _sha(raw)


def test_server_ignoring_range_restarts_from_zero(served, tmp_path):
    server, files = served
    server.ignore_range = True
    final = tmp_path / "LaMP-4" / "dev_questions.json"
    final.parent.mkdir(parents=True)
    final.with_name("dev_questions.json.part").write_bytes(b"GARBAGE-PREFIX")
    results = _get(server, dest=tmp_path, splits=["dev"])
    assert server.requests[0][1] == "bytes=14-"
    assert results[0].status == "downloaded"
    assert final.read_bytes() == files["dev_questions.json"]


def test_416_discards_part_and_restarts(served, tmp_path):
    server, files = served
    raw = files["dev_outputs.json"]
    part = tmp_path / "LaMP-4" / "dev_outputs.json.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * (len(raw) + 10))  # longer than the file: cannot be continued
    spec = FileSpec(f"{server.base_url}/LaMP_4/dev/dev_outputs.json", "LaMP-4/dev_outputs.json")
    result = download_file(spec, tmp_path, progress=False, timeout=TIMEOUT)
    assert [r for _, r in server.requests] == [f"bytes={len(raw) + 10}-", None]
    assert result.path.read_bytes() == raw
    assert not part.exists()


def test_checksum_mismatch_leaves_nothing(served, tmp_path):
    server, files = served
    wrong = "0" * 64
    with pytest.raises(DownloadError) as err:
        _get(server, dest=tmp_path, splits=["dev"], checksums={"dev_questions.json": wrong})
    message = str(err.value)
    assert message == (f"checksum mismatch for dev_questions.json: expected {wrong}, "
                       f"got {_sha(files['dev_questions.json'])}")
    assert not (tmp_path / "LaMP-4" / "dev_questions.json").exists()
    assert not (tmp_path / "LaMP-4" / "dev_questions.json.part").exists()
    assert "dev_questions.json" not in read_sums(tmp_path / "LaMP-4" / "SHA256SUMS")


def test_caller_checksums_override_pinned(served, tmp_path, monkeypatch):
    server, files = served
    monkeypatch.setitem(dl.PINNED_SHA256, "LaMP_4/dev/dev_questions.json", "f" * 64)
    good = _sha(files["dev_questions.json"]).upper()  # case-insensitive, like sha256sum output pasted in
    results = _get(server, dest=tmp_path, splits=["dev"], checksums={"dev_questions.json": good})
    assert results[0].sha256 == good.lower()
    with pytest.raises(DownloadError, match="invalid sha256 for dev_outputs.json"):
        _get(server, dest=tmp_path, splits=["dev"], checksums={"dev_outputs.json": "abc"})


def test_offline_is_one_line(tmp_path):
    with socket.socket() as sock:  # grab a free port, then close it so nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(DownloadError) as err:
        download_lamp("LaMP-4", tmp_path, splits=["dev"], base_url=f"http://127.0.0.1:{port}",
                      progress=False, timeout=TIMEOUT)
    message = str(err.value)
    assert message.startswith(f"cannot reach http://127.0.0.1:{port}/LaMP_4/dev/dev_questions.json: ")
    assert "are you offline?" in message and str(tmp_path / "LaMP-4") in message
    assert "\n" not in message
    assert not list((tmp_path / "LaMP-4").iterdir())


def test_http_404(served, tmp_path):
    server, _ = served
    with pytest.raises(DownloadError, match=r"HTTP 404") as err:
        download_lamp("LaMP-5", tmp_path, splits=["dev"], base_url=server.base_url, progress=False,
                      timeout=TIMEOUT)
    assert "/LaMP_5/dev/dev_questions.json" in str(err.value)
    assert not list((tmp_path / "LaMP-5").iterdir())


def test_non_json_body_is_rejected(served, tmp_path):
    server, _ = served
    (server.root / "LaMP_4/dev/dev_questions.json").write_text("<html>captive portal</html>")
    with pytest.raises(DownloadError, match="dev_questions.json from .* is not valid JSON"):
        _get(server, dest=tmp_path, splits=["dev"])
    assert not list((tmp_path / "LaMP-4").iterdir())


def test_rerun_skips_verified_files_and_refetches_damaged_ones(served, tmp_path):
    server, files = served
    _get(server, dest=tmp_path, splits=["dev"])
    before = len(server.requests)
    results = _get(server, dest=tmp_path, splits=["dev"])
    assert [r.status for r in results] == ["skipped", "skipped"]
    assert len(server.requests) == before  # nothing fetched again

    damaged = tmp_path / "LaMP-4" / "dev_outputs.json"
    damaged.write_text("{}")
    results = _get(server, dest=tmp_path, splits=["dev"])
    assert [r.status for r in results] == ["skipped", "downloaded"]
    assert server.requests[before:] == [("/LaMP_4/dev/dev_outputs.json", None)]
    assert damaged.read_bytes() == files["dev_outputs.json"]


def test_silent_server_times_out_as_one_line(tmp_path):
    with socket.socket() as sock:  # accepts connections (backlog) but never answers
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        spec = FileSpec(f"http://127.0.0.1:{port}/LaMP_4/dev/dev_questions.json", "LaMP-4/dev_questions.json")
        with pytest.raises(DownloadError, match=r"^cannot reach .*: timed out \(are you offline\?"):
            download_file(spec, tmp_path, progress=False, timeout=0.2)
    assert not (tmp_path / "LaMP-4" / "dev_questions.json").exists()
