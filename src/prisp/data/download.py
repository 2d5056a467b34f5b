"""Download the official LaMP benchmark files, resumably and verifiably.

Files come from the LaMP server (or a mirror named by ``PRISP_LAMP_URL``) and land as
``DEST/<task>/<split>_questions.json`` and ``DEST/<task>/<split>_outputs.json``, the layout
the rest of prisp reads with ``--data DEST``. Each transfer streams into ``<file>.part``, so an
interrupted run resumes with an HTTP range request, and the final name only ever appears through
an atomic rename of a complete, checksummed, parseable file. Digests are recorded in
``DEST/<task>/SHA256SUMS`` (``sha256sum`` format) so a re-run skips files that are already good.

Every failure a user can hit (offline, HTTP error, truncated transfer, checksum mismatch, a
non-JSON body) surfaces as a one-line :class:`~prisp.errors.DownloadError`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from prisp.data.tasks import get_task
from prisp.errors import DownloadError
from prisp.files import fsync_dir, fsync_file, write_atomic

DEFAULT_BASE_URL = "https://ciir.cs.umass.edu/downloads/LaMP"
BASE_URL_ENV = "PRISP_LAMP_URL"
SPLITS: tuple[str, ...] = ("train", "dev", "test")
DEFAULT_SPLITS: tuple[str, ...] = ("train", "dev")
SUMS_FILE = "SHA256SUMS"
PART_SUFFIX = ".part"
USER_AGENT = "prisp-lamp-downloader/0.1"

# Known-good digests keyed by the URL path below the base URL, e.g. "LaMP_4/dev/dev_questions.json".
# Deliberately empty: the official server was not reachable when this module was written, so no digest
# could be verified by hand and pinning an unverified one would only block good downloads. Add entries
# once checked; caller-given ``checksums`` override them.
PINNED_SHA256: dict[str, str] = {}

_CHUNK = 1 << 16
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_SUMS_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")
_CONTENT_RANGE = re.compile(r"^bytes\s+(\d+)-(\d+)/(\d+|\*)$")


@dataclass(frozen=True)
class FileSpec:
    """One file to fetch.

    Attributes:
        url: absolute URL of the file.
        dest: destination relative to the download root, POSIX style, e.g. ``"LaMP-4/dev_questions.json"``.
        sha256: expected lowercase hex digest, or ``None`` when no digest is known.
    """

    url: str
    dest: str
    sha256: str | None = None

    @property
    def name(self) -> str:
        """The file name, e.g. ``"dev_questions.json"``."""
        return self.dest.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class DownloadResult:
    """What :func:`download_file` did for one file.

    Attributes:
        spec: the file that was requested.
        path: where the verified file now lives.
        sha256: its hex digest.
        size: its size in bytes.
        status: ``"downloaded"``, ``"resumed"`` (continued a ``.part``) or ``"skipped"`` (already good).
    """

    spec: FileSpec
    path: Path
    sha256: str
    size: int
    status: str

    def describe(self) -> str:
        """One line for the CLI, e.g. ``downloaded LaMP-4/dev_questions.json (1234 bytes, sha256 ab12...)``."""
        return f"{self.status} {self.spec.dest} ({self.size} bytes, sha256 {self.sha256[:12]})"


def resolve_base_url(base_url: str | None = None) -> str:
    """The server root: ``base_url`` if given, else ``$PRISP_LAMP_URL``, else the official server."""
    chosen = base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    return chosen.rstrip("/")


def lamp_files(
    task: str, splits: Iterable[str] = DEFAULT_SPLITS, base_url: str | None = None
) -> list[FileSpec]:
    """The files that make up ``splits`` of a LaMP task, with any pinned digests.

    Args:
        task: task name in any accepted spelling (``"LaMP-4"``, ``"lamp_4"``).
        splits: any of ``train``, ``dev``, ``test``; ``test`` has questions only (outputs are hidden).
        base_url: server root; ``None`` means ``$PRISP_LAMP_URL`` or :data:`DEFAULT_BASE_URL`.

    Returns:
        One :class:`FileSpec` per file, questions before outputs, in split order.

    Raises:
        DataError: unknown task.
        DownloadError: unknown or missing split.
    """
    spec = get_task(task)
    root = resolve_base_url(base_url)
    files = []
    for split in _check_splits(splits):
        kinds = ("questions",) if split == "test" else ("questions", "outputs")
        for kind in kinds:
            remote = f"{spec.official_dir}/{split}/{split}_{kind}.json"
            files.append(FileSpec(f"{root}/{remote}", f"{spec.name}/{split}_{kind}.json",
                                  PINNED_SHA256.get(remote)))
    return files


def download_lamp(
    task: str,
    dest: str | os.PathLike[str],
    splits: Iterable[str] = DEFAULT_SPLITS,
    base_url: str | None = None,
    checksums: dict[str, str] | None = None,
    progress: bool = True,
    *,
    timeout: float = 30.0,
    on_result: Callable[[DownloadResult], None] | None = None,
) -> list[DownloadResult]:
    """Fetch a LaMP task's files into ``dest/<task>/``, skipping those already verified.

    Args:
        task: task name in any accepted spelling.
        dest: download root; files land in ``dest/<canonical task>/``.
        splits: any of ``train``, ``dev``, ``test``.
        base_url: server root; ``None`` means ``$PRISP_LAMP_URL`` or the official server.
        checksums: expected digests keyed by file name (``"dev_questions.json"``); they override
            :data:`PINNED_SHA256`.
        progress: show a progress bar (only ever on a terminal).
        timeout: socket timeout in seconds for connecting and for each read.
        on_result: called after each file, so a caller can report while later files download.

    Returns:
        One :class:`DownloadResult` per file, in :func:`lamp_files` order.

    Raises:
        DownloadError: the first file that could not be fetched and verified; earlier files stay.
    """
    overrides = {name: _normalize_digest(digest, name) for name, digest in (checksums or {}).items()}
    results = []
    for spec in lamp_files(task, splits, base_url):
        if spec.name in overrides:
            spec = dataclasses.replace(spec, sha256=overrides[spec.name])
        result = download_file(spec, dest, progress=progress, timeout=timeout)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def download_file(
    spec: FileSpec, dest_root: str | os.PathLike[str], *, progress: bool = True, timeout: float = 30.0
) -> DownloadResult:
    """Fetch one file into ``dest_root / spec.dest``, resuming a ``.part`` left by an earlier run.

    Args:
        spec: what to fetch and, optionally, its expected digest.
        dest_root: download root.
        progress: show a progress bar (only ever on a terminal).
        timeout: socket timeout in seconds for connecting and for each read.

    Returns:
        The verified file.

    Raises:
        DownloadError: unreachable server, HTTP error, truncated transfer, checksum mismatch,
            non-JSON body, or an unwritable destination. No final file is created in any of these cases.
    """
    final = Path(dest_root) / spec.dest
    try:
        return _download_file(spec, final, progress=progress, timeout=timeout)
    except DownloadError:
        raise
    except OSError as exc:
        # Network errors were already translated, so what is left is the local disk (permissions, space).
        raise DownloadError(f"cannot write {final}: {_reason(exc)}") from exc


def _download_file(spec: FileSpec, final: Path, *, progress: bool, timeout: float) -> DownloadResult:
    final.parent.mkdir(parents=True, exist_ok=True)
    sums_path = final.parent / SUMS_FILE
    part = final.with_name(final.name + PART_SUFFIX)
    expected = _normalize_digest(spec.sha256, spec.name) if spec.sha256 else None
    # A caller's digest outranks our own record: the record only says what we last fetched.
    known = expected or read_sums(sums_path).get(final.name)
    if known and final.is_file():
        digest = sha256_file(final)
        if digest == known:
            part.unlink(missing_ok=True)
            _record_sum(sums_path, final.name, digest)
            return DownloadResult(spec, final, digest, final.stat().st_size, "skipped")
    resumed = _fetch(spec, part, hint_dir=final.parent, progress=progress, timeout=timeout)
    digest = sha256_file(part)
    if expected and digest != expected:
        # A wrong file must not be resumed from either, so the part goes too.
        part.unlink(missing_ok=True)
        raise DownloadError(f"checksum mismatch for {spec.name}: expected {expected}, got {digest}")
    _check_json(part, spec)
    fsync_file(part)
    os.replace(part, final)
    fsync_dir(final.parent)
    _record_sum(sums_path, final.name, digest)
    return DownloadResult(spec, final, digest, final.stat().st_size, "resumed" if resumed else "downloaded")


def _fetch(spec: FileSpec, part: Path, *, hint_dir: Path, progress: bool, timeout: float) -> bool:
    """Complete ``part`` from the server; True when earlier bytes were kept (a real resume)."""
    offset = part.stat().st_size if part.is_file() else 0
    response = _open(spec.url, offset, timeout, hint_dir)
    if response is None:
        # 416: the server cannot continue from our offset (part complete or longer than the file);
        # starting over is the only answer that is always right.
        part.unlink(missing_ok=True)
        offset = 0
        response = _open(spec.url, 0, timeout, hint_dir)
        assert response is not None  # a request without Range never yields 416 handling
    with response:
        start, total = _response_span(response, spec.url, offset)
        _stream(response, part, start=start, total=total, spec=spec, progress=progress)
    return start > 0


def _open(url: str, offset: int, timeout: float, hint_dir: Path) -> http.client.HTTPResponse | None:
    """Send the GET (with ``Range`` when resuming); ``None`` means the server answered 416."""
    # identity encoding: byte ranges must refer to the stored file, not a compressed rendering of it.
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - http(s) URL by design
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:
            return None
        raise DownloadError(f"download of {url} failed: HTTP {exc.code} {_reason(exc.reason)}") from exc
    except urllib.error.URLError as exc:
        raise _unreachable(url, exc.reason, hint_dir) from exc
    except (OSError, http.client.HTTPException) as exc:
        raise _unreachable(url, exc, hint_dir) from exc
    except ValueError as exc:
        raise DownloadError(f"invalid download URL {url!r}: {_reason(exc)}") from exc


def _response_span(response: http.client.HTTPResponse, url: str, offset: int) -> tuple[int, int | None]:
    """Where the body starts in the file and the file's full size (``None`` if not announced)."""
    if response.status != 206:
        # A 200 to a range request means the server ignored Range: the body is the whole file.
        length = response.headers.get("Content-Length")
        return 0, int(length) if length and length.isdigit() else None
    match = _CONTENT_RANGE.match(response.headers.get("Content-Range", "").strip())
    if not match:
        raise DownloadError(f"download of {url} failed: bad Content-Range in a 206 answer")
    start = int(match.group(1))
    if start > offset:
        # Writing there would leave a hole of unknown bytes in the part.
        raise DownloadError(f"download of {url} failed: server resumed at byte {start}, not {offset}")
    total = None if match.group(3) == "*" else int(match.group(3))
    return start, total


def _stream(
    response: http.client.HTTPResponse, part: Path, *, start: int, total: int | None, spec: FileSpec,
    progress: bool,
) -> None:
    """Append the body to ``part`` from byte ``start`` and check the size the server announced."""
    done = start
    show = progress and sys.stderr.isatty()
    with open(part, "ab") as fh, tqdm(total=total, initial=start, unit="B", unit_scale=True,
                                      unit_divisor=1024, desc=spec.name, disable=not show, leave=False) as bar:
        # Drops whatever lies beyond ``start`` (everything, on a restart) before appending.
        fh.truncate(start)
        while True:
            try:
                chunk = response.read(_CHUNK)
            except (OSError, http.client.HTTPException) as exc:
                raise DownloadError(f"download of {spec.url} interrupted after {done} bytes: {_reason(exc)}; "
                                    "run again to resume") from exc
            if not chunk:
                break
            fh.write(chunk)
            done += len(chunk)
            bar.update(len(chunk))
    if total is not None and done > total:
        part.unlink(missing_ok=True)
        raise DownloadError(f"download of {spec.url} failed: got {done} bytes, server announced {total}")
    if total is not None and done < total:
        # http.client reports a connection closed early as a short read, not an error; catch it here.
        raise DownloadError(f"download of {spec.url} stopped at {done} of {total} bytes; run again to resume")


def _check_json(part: Path, spec: FileSpec) -> None:
    """Remove ``part`` and raise unless it parses as a JSON array or object."""
    marker = object()
    why = "not a JSON array or object"
    try:
        with open(part, "rb") as fh:
            # Collapsing every object to a marker keeps memory near the file size on multi-GB train files.
            top = json.load(fh, object_pairs_hook=lambda _pairs: marker)
    except (ValueError, RecursionError) as exc:
        top, why = None, _reason(exc)
    if top is not marker and not isinstance(top, list):
        part.unlink(missing_ok=True)
        raise DownloadError(f"{spec.name} from {spec.url} is not valid JSON ({why}); "
                            "the server may have sent an error page")


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def read_sums(path: str | os.PathLike[str]) -> dict[str, str]:
    """Digests recorded in a ``sha256sum``-format file, keyed by file name; ``{}`` if there is none."""
    path = Path(path)
    if not path.is_file():
        return {}
    sums = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = _SUMS_LINE.match(line.strip())
        if match:
            sums[match.group(2)] = match.group(1).lower()
    return sums


def _record_sum(path: Path, name: str, digest: str) -> None:
    """Set ``name``'s digest in the sums file, rewriting it atomically so a crash never truncates it."""
    sums = read_sums(path)
    if sums.get(name) == digest:
        return
    sums[name] = digest
    text = "".join(f"{value}  {key}\n" for key, value in sorted(sums.items()))
    write_atomic(path, text)


def _check_splits(splits: Iterable[str]) -> list[str]:
    """Validated splits, duplicates dropped, order kept."""
    if isinstance(splits, str):
        splits = [splits]  # a lone "dev" would otherwise iterate as "d", "e", "v"
    chosen = list(dict.fromkeys(str(s).strip().lower() for s in splits))
    unknown = [s for s in chosen if s not in SPLITS]
    if unknown:
        raise DownloadError(f"unknown split {unknown[0]!r}; expected one of: {', '.join(SPLITS)}")
    if not chosen:
        raise DownloadError(f"no split chosen; expected some of: {', '.join(SPLITS)}")
    return chosen


def _normalize_digest(digest: str, name: str) -> str:
    value = str(digest).strip().lower()
    if not _HEX64.match(value):
        raise DownloadError(f"invalid sha256 for {name}: {digest!r} (expected 64 hex digits)")
    return value


def _unreachable(url: str, reason: object, hint_dir: Path) -> DownloadError:
    return DownloadError(f"cannot reach {url}: {_reason(reason)} "
                         f"(are you offline? the files can also be placed by hand in {hint_dir}{os.sep})")


def _reason(error: object) -> str:
    """A one-line reason: ``strerror`` when the error has one (drops ``[Errno N]`` noise), else its text."""
    text = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return " ".join(str(text).split())
