"""Download published data files, verified by size and sha256, atomically and resumably.

A dataset is a list of RemoteFile(name, url, size, sha256). `fetch_files` puts each file in one
directory:
- a file already there with the expected size and sha256 is kept (nothing is downloaded);
- otherwise the file is downloaded to a hidden "<directory>/.<name>.part" and renamed into place
  only once its size and sha256 match, so a reader never sees a partial or unverified file;
- a connection that drops mid-file is retried from where it stopped (an HTTP Range request;
  a server that ignores Range sends the whole file again), and after the last retry the bytes
  received stay in the .part file, so running the command again resumes there;
- a size or sha256 mismatch deletes the download and raises ChecksumError naming the file, the
  expected and the received values.
One process at a time works in a directory (an flock on it), so hosts sharing a filesystem can
run the same command at once.

`mappa-data paper-math` (mappa_jax/data_cli.py) fetches PAPER_MATH, the problem files of the MAPPA
paper's math experiments, into data/paper/, where configs/mathchat_*.py read them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import http.client
import json
import os
import pathlib
import re
import sys
import time
import urllib.error
import urllib.request
from typing import Callable, Iterable, Iterator, Sequence

from mappa_jax.data.task import DataError

_CHUNK = 1 << 16
_USER_AGENT = "mappa-jax-data/1"
_SHA256 = re.compile(r"[0-9a-f]{64}")


class DownloadError(DataError):
    """A file could not be downloaded (HTTP error, connection lost after the last retry)."""


class ChecksumError(DownloadError):
    """A downloaded file has another size or sha256 than its manifest says."""


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    name: str  # file name in the destination directory
    url: str
    size: int  # bytes
    sha256: str  # hex digest

    def __post_init__(self):
        where = f"remote file {self.name!r}"
        if not self.name or pathlib.PurePath(self.name).name != self.name or self.name in (".", ".."):
            raise DataError(f"{where}: name must be a plain file name (no directories)")
        if not self.url.startswith(("https://", "http://")):
            raise DataError(f"{where}: url must be http(s)://..., got {self.url!r}")
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 0:
            raise DataError(f"{where}: size must be a non-negative integer, got {self.size!r}")
        if not isinstance(self.sha256, str) or not _SHA256.fullmatch(self.sha256):
            raise DataError(f"{where}: sha256 must be 64 lowercase hex digits, got {self.sha256!r}")


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str  # what `mappa-data NAME` calls it
    description: str
    default_dir: str  # relative to the working directory
    files: tuple[RemoteFile, ...]


# The authors' problem files (ltjed/multiagent-coaching, MIT licence) at a pinned commit.
PAPER_MATH_COMMIT = "ed66921df05e0765a9dfe86017e296d4276b58fa"
_PAPER_MATH_URL = ("https://raw.githubusercontent.com/ltjed/multiagent-coaching/"
                   f"{PAPER_MATH_COMMIT}/data/Bench/")
PAPER_MATH = Dataset(
    name="paper-math",
    description="the MAPPA paper's math problems (AIME 1983-2024 for training; AIME 2025 and "
                "AMC for evaluation), from ltjed/multiagent-coaching at commit "
                f"{PAPER_MATH_COMMIT[:12]}",
    default_dir="data/paper",
    files=tuple(RemoteFile(name, _PAPER_MATH_URL + name, size, sha256) for name, size, sha256 in (
        ("AIME_1983_2024.json", 442572,
         "bf08c2a301e4f5dc338453c1e19d0993448452a0d5fdb739826cf609255671d3"),
        ("aime_2025.json", 12441,
         "ad3c0c8341eedc8f3b7d4048a66ded19aca59403f373fb69aa153e95c719682b"),
        ("amc_eval_32.json", 10690,
         "ba208c17af3586190f6fb54695f3ce5627cdbd535af0038789f42d6aeedf6c0a"),
        ("amc.json", 42221,
         "a919ebffad605711fe89323a8c8511ed997c570510eea31585594346c5f8e585"),
    )))
DATASETS = {dataset.name: dataset for dataset in (PAPER_MATH,)}


def missing_file_hint(path: str | os.PathLike) -> str:
    """For a missing data file that a known dataset publishes: the command that fetches it."""
    path = pathlib.Path(path)
    for dataset in DATASETS.values():
        if any(remote.name == path.name for remote in dataset.files):
            where = "" if path.parent == pathlib.Path(dataset.default_dir) else f" --dir {path.parent}"
            return (f" (a file of the published {dataset.name!r} data: run `mappa-data "
                    f"{dataset.name}{where}` to download and verify it)")
    return ""


def read_manifest(path: str | os.PathLike) -> tuple[RemoteFile, ...]:
    """Files from a JSON manifest: a list of {name, url, size, sha256} (or {"files": [...]})."""
    path = pathlib.Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise DataError(f"manifest not found: {path}") from err
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from err
    entries = payload.get("files") if isinstance(payload, dict) else payload
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{path}: expected a non-empty list of files (or {{\"files\": [...]}})")
    fields = {field.name for field in dataclasses.fields(RemoteFile)}
    files = []
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) != fields:
            got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise DataError(f"{path}: file {number} must have exactly the keys {sorted(fields)}, "
                            f"got {got}")
        try:
            files.append(RemoteFile(**entry))
        except DataError as err:
            raise DataError(f"{path}: file {number}: {err}") from err
    names = [f.name for f in files]
    if len(set(names)) != len(names):
        raise DataError(f"{path}: file names repeat: {sorted(n for n in set(names) if names.count(n) > 1)}")
    return tuple(files)


@dataclasses.dataclass(frozen=True)
class FetchResult:
    name: str
    path: pathlib.Path
    status: str  # "present" (kept, verified), "downloaded", "resumed" or "replaced"


def file_digest(path: pathlib.Path) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def is_verified(path: pathlib.Path, remote: RemoteFile) -> bool:
    return path.is_file() and file_digest(path) == (remote.size, remote.sha256)


class _Transient(Exception):
    """A failure worth retrying (connection lost, timeout, HTTP 5xx/429)."""


@contextlib.contextmanager
def _directory_lock(directory: pathlib.Path) -> Iterator[None]:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _fsync_directory(directory: pathlib.Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _progress_bar(remote: RemoteFile, initial: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=remote.size, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
                desc=remote.name, disable=not enabled, file=sys.stderr, leave=False)


def _download_once(remote: RemoteFile, part: pathlib.Path, timeout_s: float,
                   progress: bool) -> None:
    """Append the rest of `remote` to `part` (all of it when part is empty or the server ignores
    Range). Raises _Transient for failures worth retrying."""
    offset = part.stat().st_size if part.exists() else 0
    if part.exists() and offset >= remote.size:  # complete already, or longer than it should be
        if offset == remote.size:
            return
        part.unlink()
        offset = 0
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(remote.url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # the server cannot resume there: start over
            part.unlink()
            raise _Transient(f"HTTP 416 for a resume at byte {offset}") from err
        if err.code in (408, 429) or err.code >= 500:
            raise _Transient(f"HTTP {err.code} {err.reason}") from err
        raise DownloadError(f"{remote.name}: {remote.url} answered HTTP {err.code} "
                            f"{err.reason}") from err
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        raise _Transient(f"cannot reach {remote.url}: {getattr(err, 'reason', err)}") from err
    with response:
        if offset and response.status == 206:
            content_range = response.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {offset}-"):
                part.unlink()
                raise _Transient(f"the server resumed at {content_range!r}, not at byte {offset}")
        else:
            offset = 0  # a full response (200): the server ignored Range
        received = offset
        with open(part, "ab" if offset else "wb") as out, \
                _progress_bar(remote, offset, progress) as bar:
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except (OSError, http.client.HTTPException) as err:
                    raise _Transient(f"connection lost after {received} of {remote.size} "
                                     f"bytes ({err})") from err
                if not chunk:
                    break
                received += len(chunk)
                if received > remote.size:
                    out.close()
                    part.unlink()
                    raise ChecksumError(f"{remote.name}: the server sent more than the expected "
                                        f"{remote.size} bytes ({remote.url}); nothing was kept")
                out.write(chunk)
                bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
    if received < remote.size:
        raise _Transient(f"the connection closed after {received} of {remote.size} bytes")


def _check_download(remote: RemoteFile, part: pathlib.Path) -> None:
    size, digest = file_digest(part)
    if (size, digest) != (remote.size, remote.sha256):
        part.unlink()
        raise ChecksumError(
            f"{remote.name}: the download from {remote.url} does not match its manifest: "
            f"expected {remote.size} bytes with sha256 {remote.sha256}, got {size} bytes with "
            f"sha256 {digest}; the download was deleted")


def _download(remote: RemoteFile, part: pathlib.Path, retries: int, timeout_s: float,
              retry_wait_s: float, progress: bool) -> None:
    for attempt in range(retries + 1):
        try:
            return _download_once(remote, part, timeout_s, progress)
        except _Transient as err:
            if attempt == retries:
                kept = part.stat().st_size if part.exists() else 0
                raise DownloadError(
                    f"{remote.name}: download from {remote.url} failed after {attempt + 1} "
                    f"attempt(s): {err}. The {kept} bytes received are kept in {part}; run the "
                    f"command again to resume") from err
            time.sleep(retry_wait_s * 2 ** attempt)


def fetch_file(remote: RemoteFile, directory: pathlib.Path, *, retries: int = 3,
               timeout_s: float = 60.0, retry_wait_s: float = 1.0,
               progress: bool = True) -> FetchResult:
    """Make `directory/remote.name` the verified file (see the module doc). The caller holds
    the directory lock."""
    target = directory / remote.name
    replacing = target.exists()
    if replacing and is_verified(target, remote):
        return FetchResult(remote.name, target, "present")
    part = directory / f".{remote.name}.part"
    resumed = part.exists() and part.stat().st_size > 0
    download = lambda: _download(remote, part, retries, timeout_s, retry_wait_s, progress)
    download()
    try:
        _check_download(remote, part)
    except ChecksumError:
        if not resumed:
            raise
        # The bytes kept from an earlier attempt may belong to another version of the file
        # (_check_download deleted them): download it whole once before calling it a mismatch.
        download()
        _check_download(remote, part)
    os.replace(part, target)
    _fsync_directory(directory)
    status = "replaced" if replacing else ("resumed" if resumed else "downloaded")
    return FetchResult(remote.name, target, status)


def fetch_files(files: Sequence[RemoteFile], directory: str | os.PathLike, *, retries: int = 3,
                timeout_s: float = 60.0, retry_wait_s: float = 1.0, progress: bool = True,
                log: Callable[[str], None] | None = None) -> list[FetchResult]:
    """Download and verify `files` into `directory` (created if needed); see the module doc."""
    if retries < 0:
        raise DataError(f"retries must be >= 0, got {retries}")
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    results = []
    with _directory_lock(directory):
        for remote in files:
            result = fetch_file(remote, directory, retries=retries, timeout_s=timeout_s,
                                retry_wait_s=retry_wait_s, progress=progress)
            if log is not None:
                log(_describe(result, remote))
            results.append(result)
    return results


def check_files(files: Iterable[RemoteFile], directory: str | os.PathLike) -> dict[str, str]:
    """name -> "ok", "missing" or "mismatch" for the files as they are in `directory`."""
    directory = pathlib.Path(directory)
    states = {}
    for remote in files:
        path = directory / remote.name
        states[remote.name] = ("missing" if not path.is_file()
                               else "ok" if is_verified(path, remote) else "mismatch")
    return states


def _describe(result: FetchResult, remote: RemoteFile) -> str:
    what = {"present": "already present, verified", "downloaded": "downloaded, verified",
            "resumed": "resumed, verified",
            "replaced": "did not match its sha256; downloaded again, verified"}[result.status]
    return f"{result.path}: {what} ({remote.size:,} bytes, sha256 {remote.sha256[:12]}...)"
