"""``python -m orz_jax.data download`` against a real HTTP server on 127.0.0.1 (threading ``http.server`` with
``Range`` support): a good file, a corrupted one, a truncated one, a resumed partial download, a server that
ignores ranges, a 404; nothing is ever left under the final name when a file fails. Blob ids are checked against
``git hash-object``'s definition computed here independently, and, where ``git`` exists, against git itself."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from orz_jax.data import download as dl
from orz_jax.data.__main__ import main as data_main

from conftest import REPO, SHARED_DATA

GOOD = json.dumps([[{"from": "human", "value": f"What is {i} + {i}?"},
                    {"from": "assistant", "ground_truth": {"value": str(2 * i)}}] for i in range(3000)]).encode()


def blob(data: bytes) -> str:
    return hashlib.sha1(b"blob " + str(len(data)).encode() + b"\x00" + data).hexdigest()


class Server:
    """Serves ``files`` (url path -> bytes). ``truncate_at[path] = k``: never send bytes past offset k (the
    connection closes early, Content-Length still announces the whole range). ``no_range``: paths whose handler
    ignores Range and sends the whole file with 200. Records each request's (path, Range header)."""

    def __init__(self, files, truncate_at=None, no_range=()):
        self.files, self.truncate_at, self.no_range = files, truncate_at or {}, set(no_range)
        self.requests: list[tuple[str, str | None]] = []
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                srv.requests.append((self.path, rng))
                data = srv.files.get(self.path)
                if data is None:
                    self.send_error(404, "Not Found")
                    return
                start = 0
                if rng and self.path not in srv.no_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                end = min(len(data), srv.truncate_at.get(self.path, len(data)))
                self.wfile.write(data[start:max(start, end)])
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_blob_id_matches_git(tmp_path):
    p = tmp_path / "x.json"
    p.write_bytes(GOOD)
    assert dl.git_blob_id(str(p)) == blob(GOOD)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert dl.git_blob_id(str(empty)) == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"  # git's well-known empty blob
    if shutil.which("git"):
        out = subprocess.run(["git", "hash-object", str(p)], capture_output=True, text=True, check=True).stdout
        assert out.strip() == blob(GOOD)


def test_good_corrupted_truncated_and_missing(tmp_path):
    bad = bytearray(GOOD)
    bad[len(bad) // 2] ^= 0x01  # one flipped bit, same size
    files = {"/d/good.json": GOOD, "/d/bad.json": bytes(bad), "/d/trunc.json": GOOD}
    with Server(files, truncate_at={"/d/trunc.json": 1000}) as srv:
        dest = tmp_path / "out"
        assert dl.download_file(f"{srv.url}/d/good.json", str(dest / "good.json"), blob(GOOD)) == "downloaded"
        assert (dest / "good.json").read_bytes() == GOOD and not (dest / "good.json.part").exists()
        n = len(srv.requests)
        assert dl.download_file(f"{srv.url}/d/good.json", str(dest / "good.json"), blob(GOOD)) == "present"
        assert len(srv.requests) == n  # verified locally, nothing fetched

        with pytest.raises(dl.DownloadError, match=f"bad.json: content check failed: expected git blob "
                                                   f"{blob(GOOD)}, got {blob(bytes(bad))}"):
            dl.download_file(f"{srv.url}/d/bad.json", str(dest / "bad.json"), blob(GOOD))
        assert not (dest / "bad.json").exists() and not (dest / "bad.json.part").exists()

        with pytest.raises(dl.DownloadError, match=r"trunc.json: truncated: got 0 of \d+ bytes"):
            dl.download_file(f"{srv.url}/d/trunc.json", str(dest / "trunc.json"), blob(GOOD), retries=2, backoff_s=0.01)
        assert not (dest / "trunc.json").exists()
        assert (dest / "trunc.json.part").read_bytes() == GOOD[:1000]  # kept, to resume from
        trunc_reqs = [r for p, r in srv.requests if p == "/d/trunc.json"]
        assert trunc_reqs == [None, "bytes=1000-", "bytes=1000-"]  # first try + 2 resumed retries

        with pytest.raises(dl.DownloadError, match=r"nope.json: HTTP 404 Not Found for http://127\.0\.0\.1:\d+/d/nope"):
            dl.download_file(f"{srv.url}/d/nope.json", str(dest / "nope.json"), blob(GOOD))
        assert not (dest / "nope.json").exists()

        # The server recovers: the next run resumes after the 1000 bytes it has.
        srv.truncate_at.clear()
        assert dl.download_file(f"{srv.url}/d/trunc.json", str(dest / "trunc.json"), blob(GOOD)) == "downloaded"
        assert (dest / "trunc.json").read_bytes() == GOOD
        assert srv.requests[-1] == ("/d/trunc.json", "bytes=1000-")


def test_resume_partial_and_server_without_ranges(tmp_path):
    files = {"/a.json": GOOD, "/b.json": GOOD, "/c.json": GOOD}
    with Server(files, no_range={"/b.json"}) as srv:
        k = 12345
        (tmp_path / "a.json.part").write_bytes(GOOD[:k])
        dl.download_file(f"{srv.url}/a.json", str(tmp_path / "a.json"), blob(GOOD))
        assert (tmp_path / "a.json").read_bytes() == GOOD and srv.requests == [("/a.json", f"bytes={k}-")]

        (tmp_path / "b.json.part").write_bytes(b"garbage that is not a prefix")  # rewritten on a 200 answer
        dl.download_file(f"{srv.url}/b.json", str(tmp_path / "b.json"), blob(GOOD))
        assert (tmp_path / "b.json").read_bytes() == GOOD

        (tmp_path / "c.json.part").write_bytes(GOOD)  # complete already: the server answers 416
        dl.download_file(f"{srv.url}/c.json", str(tmp_path / "c.json"), blob(GOOD))
        assert (tmp_path / "c.json").read_bytes() == GOOD

        (tmp_path / "a.json").write_bytes(GOOD[:-1] + b"!")  # a wrong file under the final name is replaced
        assert dl.download_file(f"{srv.url}/a.json", str(tmp_path / "a.json"), blob(GOOD)) == "downloaded"
        assert (tmp_path / "a.json").read_bytes() == GOOD


def test_cli_downloads_the_table(tmp_path, monkeypatch, capsys):
    """``python -m orz_jax.data download`` (through the dispatcher) over a file table pointing at the server."""
    other = GOOD[::-1]
    table = (dl.RemoteFile("data/x.json", "x.json", blob(GOOD), "train"),
             dl.RemoteFile("data/eval_data/y.json", "eval_y.json", blob(other), "eval"))
    monkeypatch.setattr(dl, "ORZ_FILES", table)
    with Server({"/base/data/x.json": GOOD, "/base/data/eval_data/y.json": other}) as srv:
        dest = tmp_path / "data" / "orz"
        assert data_main(["download", "--dest", str(dest), "--base-url", srv.url + "/base", "--only", "eval"]) == 0
        assert sorted(p.name for p in dest.iterdir()) == ["eval_y.json"]
        monkeypatch.setenv(dl.BASE_URL_ENV, srv.url + "/base")  # the env var works as the base URL too
        assert data_main(["download", "--dest", str(dest)]) == 0
        assert (dest / "x.json").read_bytes() == GOOD and (dest / "eval_y.json").read_bytes() == other
        out = capsys.readouterr().out
        assert "eval_y.json: present" in out and "x.json: downloaded" in out

        srv.files["/base/data/x.json"] = other  # the server now serves the wrong bytes
        (dest / "x.json").unlink()
        assert data_main(["download", "--dest", str(dest), "--only", "x.json"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: x.json: content check failed: expected git blob") and err.count("\n") == 1
        assert not (dest / "x.json").exists()
    assert data_main(["no-such-command"]) == 2


def test_embedded_ids_cover_the_orz_files():
    assert {rf.name for rf in dl.ORZ_FILES} == {
        "orz_math_57k_collected.json", "orz_math_72k_collection_extended.json", "orz_math_13k_collection_hard.json",
        "eval_math500.json", "eval_aime2024.json", "eval_gpqa_diamond.json"}
    assert all(len(rf.blob_id) == 40 and int(rf.blob_id, 16) >= 0 for rf in dl.ORZ_FILES)
    assert dl.DEFAULT_BASE_URL.endswith(dl.ORZ_COMMIT) and len(dl.ORZ_COMMIT) == 40
    assert dl.missing_files_hint(["data/orz/orz_math_57k_collected.json"]) == \
        "python -m orz_jax.data download --dest data/orz"
    assert dl.missing_files_hint(["elsewhere/mine.json"]) is None
    # Extra coverage where ORZ's real eval files are at hand (../shared or $ORZ_SHARED_DATA): the embedded ids are
    # theirs. The downloader itself is covered above without them.
    for rf in dl.ORZ_FILES:
        if rf.kind == "eval" and (SHARED_DATA / rf.name).is_file():
            assert dl.git_blob_id(str(SHARED_DATA / rf.name)) == rf.blob_id, rf.name


# ----------------------------------------------------------------------------------------------
# data.dir in the configs, and the start-up line when the files are missing
# ----------------------------------------------------------------------------------------------

FETCH = "python -m orz_jax.data download --dest data/orz"


@pytest.mark.parametrize("name, train", [
    ("orz_0p5b", ["orz_math_57k_collected.json"]), ("orz_1p5b", ["orz_math_57k_collected.json"]),
    ("orz_7b", ["orz_math_57k_collected.json"]),
    ("orz_32b", ["orz_math_57k_collected.json", "orz_math_72k_collection_extended.json"]),
])
def test_orz_configs_use_the_full_files(name, train):
    from orz_jax.config import load_config

    cfg = load_config(str(REPO / "configs" / f"{name}.yaml"))
    assert cfg.data.dir == "data/orz" and [f.path for f in cfg.data.train_files] == train
    downloadable = {rf.name for rf in dl.ORZ_FILES}
    assert set(train) | set(cfg.eval.files) <= downloadable  # everything the config reads, the command fetches
    assert [cfg.data.resolve(f.path) for f in cfg.data.train_files] == [f"data/orz/{t}" for t in train]
    if len(train) == 2:  # 57k + 72k drawn as one 129k set: weights in proportion to the files' sizes
        assert [f.weight for f in cfg.data.train_files] == [57.0, 72.0]


def test_data_dir_resolution_and_missing_message(tmp_path):
    from orz_jax.config import load_config

    cfg = load_config(None, ["model.checkpoint=demo", f"data.dir={tmp_path}", "data.source=files",
                             "data.train_files=[{path: orz_math_57k_collected.json}, {path: ./mine.json}]",
                             "eval.files=[eval_math500.json, synthetic]"])
    assert cfg.data.resolve("orz_math_57k_collected.json") == str(tmp_path / "orz_math_57k_collected.json")
    assert cfg.data.resolve("./mine.json") == "./mine.json" and cfg.data.resolve("synthetic") == "synthetic"
    assert cfg.data.resolve("runs/a/hard.json") == "runs/a/hard.json"  # a directory part: as written
    assert dl.missing_data_message(cfg) == (
        f"data.train_files[0].path: file not found: {tmp_path / 'orz_math_57k_collected.json'} (and 2 more of the "
        f"configured data files); fetch ORZ's data files with: python -m orz_jax.data download --dest {tmp_path}")
    for name in ("orz_math_57k_collected.json", "eval_math500.json"):
        (tmp_path / name).write_text("[]")
    assert dl.missing_data_message(cfg) == "data.train_files[1].path: file not found: ./mine.json"


def test_orz_config_without_data_stops_at_once(tmp_path):
    """``python -m orz_jax.launch --config configs/orz_0p5b.yaml`` in a directory without data/orz: one line with
    the download command, exit 2, before any model is built (the config names no checkpoint: a model would be
    a 0.5B random init, compiled for minutes)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "orz_jax.launch", "--config", str(REPO / "configs" / "orz_0p5b.yaml")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - t0
    assert p.returncode == 2, p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: data.train_files[0].path: file not found: data/orz/orz_math_57k_collected.json (and "
                      f"3 more of the configured data files); fetch ORZ's data files with: {FETCH}"], p.stderr[-3000:]
    assert "Compiling" not in p.stderr and not (tmp_path / "runs").exists()  # stopped before the run dir
    assert seconds < 120  # imports only (a few seconds unloaded); a model build would take far longer
