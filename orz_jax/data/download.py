"""``python -m orz_jax.data download [--dest DIR]``: ORZ's training and evaluation files, verified.

The files come from ORZ's public repository (``Open-Reasoner-Zero/Open-Reasoner-Zero``, MIT License) at one
pinned commit, as raw files. Each is checked against its git blob id, ``sha1(b"blob <size>\\0" + content)``,
which is what ``git ls-tree`` lists for that commit, so a download is byte-identical to the repository's
file or it is refused. The ids below were read from ``git ls-tree -r 3fdd9a07... data/`` of that repository
(the eval ids also equal the blob ids of the eval files that ship beside this project in ``shared/data/orz``).

A file is fetched into ``<name>.part`` and moved to ``<name>`` only after its blob id checks out, so the final
name never holds a partial or wrong file. An interrupted download resumes from the ``.part`` file with an
HTTP ``Range`` request; a server that ignores the range sends the whole file and the ``.part`` is rewritten.
Every failure names the file and what went wrong: the HTTP status, a truncated body (bytes got vs. announced),
or the blob id expected vs. the one computed.

The base URL can point elsewhere (``--base-url`` or ``$ORZ_JAX_DATA_URL``): a mirror, or a test server.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Callable, Optional, Sequence

__all__ = ["ORZ_REPO", "ORZ_COMMIT", "DEFAULT_BASE_URL", "ORZ_FILES", "DownloadError", "RemoteFile",
           "git_blob_id", "download_file", "download", "missing_files_hint", "missing_data_message", "main"]

ORZ_REPO = "Open-Reasoner-Zero/Open-Reasoner-Zero"
ORZ_COMMIT = "3fdd9a07b4fb01e06005e6e74fc56690cde8a341"
DEFAULT_BASE_URL = f"https://raw.githubusercontent.com/{ORZ_REPO}/{ORZ_COMMIT}"
BASE_URL_ENV = "ORZ_JAX_DATA_URL"
DEFAULT_DEST = os.path.join("data", "orz")  # the ORZ configs' data.dir

_CHUNK = 1 << 20  # bytes per read / hash update


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """One file of the repository: ``remote`` is its path at the commit, ``name`` the local file name."""

    remote: str
    name: str
    blob_id: str  # git blob id: sha1(b"blob <size>\0" + content)
    kind: str  # "train" or "eval"


# Blob ids: `git ls-tree -r 3fdd9a07b4fb01e06005e6e74fc56690cde8a341 data/` in Open-Reasoner-Zero/Open-Reasoner-Zero.
# Local names: the training files keep the repository's names (they become the prompts' source names, as in
# ORZ); the eval files get an "eval_" prefix, the names the configs and the evaluator's reports use.
ORZ_FILES: tuple[RemoteFile, ...] = (
    RemoteFile("data/orz_math_57k_collected.json", "orz_math_57k_collected.json",
               "08812d4a47aadf8fa80a43f11431e6d41ba55b64", "train"),
    RemoteFile("data/orz_math_72k_collection_extended.json", "orz_math_72k_collection_extended.json",
               "692af2e8184c5a5ec6e9161abd89cdf561a1cb71", "train"),
    RemoteFile("data/orz_math_13k_collection_hard.json", "orz_math_13k_collection_hard.json",
               "136948e32ffd26e3988f9b9fc7be30b5626619bb", "train"),
    RemoteFile("data/eval_data/math500.json", "eval_math500.json",
               "e8ba46e18ac1a0cd112c63d863a167ad5d1cf5a2", "eval"),
    RemoteFile("data/eval_data/aime2024.json", "eval_aime2024.json",
               "2b78e73d1460af1ab43727675d43ef498994a1d4", "eval"),
    RemoteFile("data/eval_data/gpqa_diamond.json", "eval_gpqa_diamond.json",
               "1d6283c29abe432e6d68ac7cea8d43bf3f070aac", "eval"),
)


class DownloadError(RuntimeError):
    """A file could not be fetched or did not verify; the message names the file and the failure.

    retryable: a network failure after which a resumed attempt can succeed (not an HTTP error or bad content).
    """

    def __init__(self, message: str, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


def git_blob_id(path: str) -> str:
    """The git blob id of a file: sha1 over ``b"blob <size>\\0"`` then the content (read in chunks)."""
    h = hashlib.sha1(b"blob %d\0" % os.path.getsize(path))
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch_into(url: str, part: str, label: str, timeout: float) -> None:
    """One HTTP request appending to (or, without range support, rewriting) ``part``.

    Raises DownloadError naming ``label`` on an HTTP error or a body shorter than announced; the bytes received
    before a truncation stay in ``part`` so the next attempt resumes after them.
    """
    have = os.path.getsize(part) if os.path.exists(part) else 0
    req = urllib.request.Request(url, headers={"User-Agent": "orz_jax-download"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing after `have`: the .part is already whole (verified by the caller)
            return
        raise DownloadError(f"{label}: HTTP {e.code} {e.reason} for {url}") from None
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(f"{label}: cannot reach {url}: {getattr(e, 'reason', e)}", retryable=True) from None
    with resp:
        if resp.status == 206:
            start = _range_start(resp.headers.get("Content-Range", ""))
            if start != have:
                raise DownloadError(f"{label}: server answered the range request from byte {start}, "
                                    f"asked for {have} (Content-Range {resp.headers.get('Content-Range')!r})")
            mode = "ab"
        else:  # 200: the whole file (no range asked, or the server ignores ranges)
            mode, have = "wb", 0
        expected = resp.headers.get("Content-Length")
        expected = int(expected) if expected is not None and expected.isdigit() else None
        got = 0
        with open(part, mode) as f:
            while True:
                try:
                    chunk = resp.read(_CHUNK)
                except http.client.IncompleteRead as e:
                    chunk = e.partial or b""
                except OSError as e:  # reset, time-out: what arrived stays in .part for the next attempt
                    f.flush()
                    raise DownloadError(f"{label}: connection failed after {have + got} bytes: {e}",
                                        retryable=True) from None
                if not chunk:
                    break
                f.write(chunk)  # a disk error here is no network problem: it propagates as itself
                got += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        if expected is not None and got < expected:
            raise DownloadError(f"{label}: truncated: got {got} of {expected} bytes announced by the server "
                                f"(bytes {have}..{have + expected} of the file); rerun to resume", retryable=True)


def _range_start(content_range: str) -> Optional[int]:
    # "bytes 100-199/200" -> 100
    try:
        unit, rest = content_range.split(" ", 1)
        return int(rest.split("-", 1)[0]) if unit == "bytes" else None
    except ValueError:
        return None


def download_file(url: str, path: str, blob_id: str, *, retries: int = 3, timeout: float = 60.0,
                  backoff_s: float = 1.0, log: Callable[[str], None] = lambda s: None) -> str:
    """Fetch ``url`` to ``path`` and verify its git blob id; return "present" or "downloaded".

    An existing ``path`` with the right id is kept. Otherwise bytes go to ``path + ".part"`` (resumed if it
    exists, ``retries`` more attempts after a truncated body or a failed connection, waiting ``backoff_s``,
    then twice that, ...) and ``path`` is written
    only by the final rename of a verified file. A wrong blob id deletes the ``.part`` (its bytes are wrong,
    resuming would keep them) and raises DownloadError with the expected and computed ids.
    """
    label = os.path.basename(path)
    if os.path.isfile(path):
        if git_blob_id(path) == blob_id:
            return "present"
        log(f"{label}: the existing file does not match blob {blob_id}; fetching it again")
    part = path + ".part"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    for attempt in range(retries + 1):
        try:
            _fetch_into(url, part, label, timeout)
            break
        except DownloadError as e:
            if not e.retryable or attempt == retries:
                raise
            log(f"{e}; retrying ({attempt + 1}/{retries})")
            time.sleep(min(backoff_s * 2 ** attempt, 30.0))
    got = git_blob_id(part)
    if got != blob_id:
        size = os.path.getsize(part)
        os.remove(part)
        raise DownloadError(f"{label}: content check failed: expected git blob {blob_id}, got {got} "
                            f"({size} bytes from {url}); the partial file was deleted")
    os.replace(part, path)
    return "downloaded"


def download(dest: str, files: Sequence[RemoteFile] = ORZ_FILES, base_url: Optional[str] = None, *,
             retries: int = 3, timeout: float = 60.0, log: Callable[[str], None] = print) -> list[str]:
    """Download and verify ``files`` into ``dest``; return their local paths. Stops at the first failure."""
    base = (base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).rstrip("/")
    paths = []
    for rf in files:
        path = os.path.join(dest, rf.name)
        url = f"{base}/{rf.remote}"
        t0 = time.perf_counter()
        what = download_file(url, path, rf.blob_id, retries=retries, timeout=timeout, log=log)
        size = os.path.getsize(path)
        log(f"{rf.name}: {what}, {size / 1e6:.1f} MB, blob {rf.blob_id} ok ({time.perf_counter() - t0:.1f}s)")
        paths.append(path)
    return paths


def missing_files_hint(missing: Sequence[str]) -> Optional[str]:
    """The download command for missing files that this module can fetch (by file name), or None.

    ``--dest`` is the directory the first such file was expected in."""
    known = {rf.name for rf in ORZ_FILES}
    ours = [p for p in missing if os.path.basename(p) in known]
    if not ours:
        return None
    dest = os.path.dirname(ours[0]) or "."
    return f"python -m orz_jax.data download --dest {dest}"


def missing_data_message(cfg) -> Optional[str]:
    """One line naming the configured data files (``data.train_files``, ``eval.files``, resolved in
    ``data.dir``) that do not exist, with the command that fetches them when they are ORZ's; None if all exist.

    cfg: an ``orz_jax.config.Config``."""
    wanted = []  # (config key, path)
    if cfg.data.source == "files":
        wanted += [(f"data.train_files[{i}].path", cfg.data.resolve(f.path)) for i, f in enumerate(cfg.data.train_files)]
    wanted += [(f"eval.files[{i}]", cfg.data.resolve(f)) for i, f in enumerate(cfg.eval.files) if f != "synthetic"]
    missing = [(key, path) for key, path in wanted if not os.path.isfile(path)]
    if not missing:
        return None
    key, path = missing[0]
    msg = f"{key}: file not found: {path}"
    if len(missing) > 1:
        msg += f" (and {len(missing) - 1} more of the configured data files)"
    hint = missing_files_hint([p for _, p in missing])
    if hint:
        msg += f"; fetch ORZ's data files with: {hint}"
    return msg


def main(argv: Optional[Sequence[str]] = None) -> int:
    names = [rf.name for rf in ORZ_FILES]
    p = argparse.ArgumentParser(
        prog="python -m orz_jax.data download",
        description=f"Fetch ORZ's training and evaluation files ({ORZ_REPO} at {ORZ_COMMIT[:12]}, MIT License), "
                    "verified by git blob id.")
    p.add_argument("--dest", default=DEFAULT_DEST, help=f"directory to write to (default: {DEFAULT_DEST})")
    p.add_argument("--base-url", default=None,
                   help=f"where the repository's files are (default: ${BASE_URL_ENV} or {DEFAULT_BASE_URL})")
    p.add_argument("--only", nargs="+", metavar="NAME", choices=names + ["train", "eval"],
                   help="fetch only these files (local names) or kinds ('train', 'eval'); default: all")
    p.add_argument("--retries", type=int, default=3, help="resumed attempts after a truncated download")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds without data before a request fails")
    args = p.parse_args(argv)
    files = [rf for rf in ORZ_FILES if not args.only or rf.name in args.only or rf.kind in args.only]
    try:
        download(args.dest, files, args.base_url, retries=args.retries, timeout=args.timeout)
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
