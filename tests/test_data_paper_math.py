"""The paper's math data: `mappa-data paper-math` against a loopback HTTP server, the seeded
training selection, its record in the run's workdir, the overlap check and AMC's float answers.

The server (http.server in a thread on 127.0.0.1) serves generated files with the fields of the
authors' files; a manifest override gives their sizes and sha256, computed here.
"""
from __future__ import annotations

import hashlib
import http.server
import importlib.util
import json
import pathlib
import re
import threading

import pytest

from mappa_jax import data_cli
from mappa_jax.data import DataError, DataOverlapError, MathSource, check_no_overlap, load_math_tasks
from mappa_jax.data.download import (PAPER_MATH, ChecksumError, DownloadError, RemoteFile,
                                     fetch_files, read_manifest)
from mappa_jax.data.math_files import select_positions
from mappa_jax.data.overlap import find_overlap
from mappa_jax.eval.math_grading import grade_math

REPO = pathlib.Path(__file__).resolve().parents[1]
PAPER_CONFIGS = ("mathchat_qwen3_4b.py", "mathchat_r1_distill_1p5b.py")
POOL_SIZE = 933  # problems in the authors' AIME_1983_2024.json


def _aime_pool() -> list[dict]:
    rows = []
    for index in range(POOL_SIZE):
        year, number = 1983 + index // 23, index % 23 + 1
        rows.append({"prompt": f"Problem {index}: find the remainder when {index + 7}^{number} "
                               f"is divided by $1000$.", "answer": str(pow(index + 7, number, 1000)),
                     "id": f"{year}-{number}", "year": year, "problem_number": number,
                     "part": "I" if number % 2 else "II"})
    return rows


def _paper_like_files() -> dict[str, bytes]:
    """Files named and shaped like the authors' (JSON lists with their fields)."""
    aime_2025 = [{"prompt": f"AIME 2025 problem {i}: compute ${i} \\cdot 3$.", "answer": str(3 * i)}
                 for i in range(30)]
    amc_eval = [{"prompt": f"AMC problem {i}: what is ${i} + 11$?", "answer": float(i + 11),
                 "source": "amc", "id": str(100 + i)} for i in range(32)]
    amc = [{"prompt": f"AMC pool problem {i}?", "answer": float(i), "source": "amc", "id": str(i)}
           for i in range(117)]
    return {name: json.dumps(rows, indent=2).encode() for name, rows in (
        ("AIME_1983_2024.json", _aime_pool()), ("aime_2025.json", aime_2025),
        ("amc_eval_32.json", amc_eval), ("amc.json", amc))}


class LoopbackServer:
    """Serves `files` at /bench/<name>, with byte ranges; faults on request: cut a response after
    n bytes (cut_after), ignore Range (ignore_range), serve other bytes (serve_instead)."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.requests: list[tuple[str, str | None]] = []
        self.cut_after: dict[str, int] = {}
        self.ignore_range: set[str] = set()
        self.serve_instead: dict[str, bytes] = {}
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/bench/{name}"

    def _handler(self):
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                byte_range = self.headers.get("Range")
                server.requests.append((name, byte_range))
                body = server.serve_instead.get(name, server.files.get(name))
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                if byte_range and name not in server.ignore_range:
                    start = int(re.fullmatch(r"bytes=(\d+)-", byte_range)[1])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                payload = body[start:]
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                cut = server.cut_after.pop(name, None)
                if cut is not None:  # a dropped connection: fewer bytes than announced
                    payload = payload[:cut]
                    self.close_connection = True
                self.wfile.write(payload)

        return Handler

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server():
    served = LoopbackServer(_paper_like_files())
    yield served
    served.close()


def _manifest(server: LoopbackServer) -> list[RemoteFile]:
    return [RemoteFile(name, server.url(name), len(body), hashlib.sha256(body).hexdigest())
            for name, body in server.files.items()]


def _write_manifest(server: LoopbackServer, path: pathlib.Path) -> pathlib.Path:
    path.write_text(json.dumps([{"name": f.name, "url": f.url, "size": f.size, "sha256": f.sha256}
                                for f in _manifest(server)]))
    return path


def _leftovers(directory: pathlib.Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_cli_downloads_verifies_and_then_skips_present_files(server, tmp_path, capsys):
    manifest = _write_manifest(server, tmp_path / "manifest.json")
    target = tmp_path / "paper"
    args = ["paper-math", "--dir", str(target), "--manifest", str(manifest), "--quiet"]
    assert data_cli.main(args) == 0
    for name, body in server.files.items():
        assert (target / name).read_bytes() == body
    assert _leftovers(target) == []
    assert len(server.requests) == len(server.files)
    assert "4 downloaded, 0 already present" in capsys.readouterr().out

    assert data_cli.main(args) == 0  # idempotent: verified files are not fetched again
    assert len(server.requests) == len(server.files)
    out = capsys.readouterr().out
    assert out.count("already present, verified") == 4 and "0 downloaded" in out
    assert data_cli.main(args + ["--check"]) == 0


def test_checksum_mismatch_names_file_and_digests_and_keeps_nothing(server, tmp_path, capsys):
    manifest = _write_manifest(server, tmp_path / "manifest.json")
    good = server.files["aime_2025.json"]
    tampered = good.replace(b"AIME 2025 problem 7", b"AIME 2025 problem 8")
    assert len(tampered) == len(good)
    server.serve_instead["aime_2025.json"] = tampered
    target = tmp_path / "paper"
    code = data_cli.main(["paper-math", "--dir", str(target), "--manifest", str(manifest), "--quiet"])
    assert code == 1
    error = capsys.readouterr().err
    assert "aime_2025.json" in error
    assert hashlib.sha256(good).hexdigest() in error  # expected
    assert hashlib.sha256(tampered).hexdigest() in error  # got
    assert not (target / "aime_2025.json").exists() and _leftovers(target) == []
    assert (target / "AIME_1983_2024.json").read_bytes() == server.files["AIME_1983_2024.json"]
    # --check reports it, and a healthy server then completes the set.
    assert data_cli.main(["paper-math", "--dir", str(target), "--manifest", str(manifest), "--check"]) == 1
    assert "aime_2025.json: missing" in capsys.readouterr().out
    del server.serve_instead["aime_2025.json"]
    assert data_cli.main(["paper-math", "--dir", str(target), "--manifest", str(manifest), "--quiet"]) == 0


def test_interrupted_download_keeps_no_file_and_resumes_with_a_range_request(server, tmp_path):
    files = _manifest(server)[:1]  # AIME_1983_2024.json
    name, size = files[0].name, files[0].size
    server.cut_after[name] = 5000
    with pytest.raises(DownloadError, match=rf"{name}: .*after 5000 of {size} bytes.*resume"):
        fetch_files(files, tmp_path, retries=0, progress=False)
    assert not (tmp_path / name).exists()  # nothing partial under the file's own name
    assert (tmp_path / f".{name}.part").stat().st_size == 5000

    [result] = fetch_files(files, tmp_path, retries=0, progress=False)
    assert result.status == "resumed"
    assert server.requests[-1] == (name, "bytes=5000-")
    assert (tmp_path / name).read_bytes() == server.files[name]
    assert _leftovers(tmp_path) == []


def test_dropped_connection_is_retried_within_one_call(server, tmp_path):
    files = _manifest(server)[:1]
    name = files[0].name
    server.cut_after[name] = 1234
    [result] = fetch_files(files, tmp_path, retries=2, retry_wait_s=0, progress=False)
    assert result.status == "downloaded"
    assert [r for r in server.requests] == [(name, None), (name, "bytes=1234-")]
    assert (tmp_path / name).read_bytes() == server.files[name]


def test_server_ignoring_range_and_stale_partial_bytes_still_give_the_verified_file(server, tmp_path):
    files = _manifest(server)[:2]
    first, second = files[0].name, files[1].name
    (tmp_path / f".{first}.part").write_bytes(server.files[first][:300])  # a correct prefix
    server.ignore_range.add(first)
    (tmp_path / f".{second}.part").write_bytes(b"x" * 200)  # bytes of some other version
    results = fetch_files(files, tmp_path, retry_wait_s=0, progress=False)
    assert [r.status for r in results] == ["resumed", "resumed"]
    for remote in files:
        assert (tmp_path / remote.name).read_bytes() == server.files[remote.name]
    # the stale prefix failed the sha256 and was replaced by one whole download
    assert server.requests[-2:] == [(second, "bytes=200-"), (second, None)]
    assert _leftovers(tmp_path) == []


def test_a_present_file_that_does_not_match_is_replaced_only_once_verified(server, tmp_path):
    files = _manifest(server)[1:2]
    name = files[0].name
    (tmp_path / name).write_text("[]")
    server.serve_instead[name] = b"[" + b" " * (files[0].size - 2) + b"]"
    with pytest.raises(ChecksumError, match=name):
        fetch_files(files, tmp_path, progress=False)
    assert (tmp_path / name).read_text() == "[]"  # the old file stays until a verified one replaces it
    del server.serve_instead[name]
    assert [r.status for r in fetch_files(files, tmp_path, progress=False)] == ["replaced"]


def test_an_empty_published_file_is_fetched_too(server, tmp_path):
    server.files["empty.json"] = b""
    [result] = fetch_files([RemoteFile("empty.json", server.url("empty.json"), 0,
                                       hashlib.sha256(b"").hexdigest())], tmp_path, progress=False)
    assert result.status == "downloaded" and (tmp_path / "empty.json").read_bytes() == b""


def test_http_errors_and_bad_manifests_are_named(server, tmp_path):
    missing = RemoteFile("nope.json", server.url("nope.json"), 10, "0" * 64)
    with pytest.raises(DownloadError, match=r"nope\.json: .*HTTP 404"):
        fetch_files([missing], tmp_path, progress=False)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"name": "a.json", "url": "http://x/a", "size": 1, "sha256": "abc"}]))
    with pytest.raises(DataError, match=r"bad\.json: file 0: .*'a\.json'.*sha256 must be 64"):
        read_manifest(bad)
    bad.write_text(json.dumps([{"name": "../a.json", "url": "http://x/a", "size": 1, "sha256": "0" * 64}]))
    with pytest.raises(DataError, match="plain file name"):
        read_manifest(bad)


def test_selection_reproduces_the_authors_recorded_positions():
    # From the authors' run record (experiments/*/sampled_training_data_metadata.json in
    # ltjed/multiagent-coaching): 512 of 933 with seed 42, sorted "random_indices".
    positions = select_positions(POOL_SIZE, 512, 42)
    assert len(positions) == 512 == len(set(positions))
    assert positions[:24] == [0, 2, 3, 5, 6, 7, 9, 10, 11, 12, 15, 18, 22, 23, 24, 25, 28, 29,
                              30, 31, 33, 39, 41, 42]
    middle = positions.index(497)
    assert positions[middle:middle + 8] == [497, 499, 500, 501, 506, 507, 512, 513]
    assert positions[-8:] == [921, 922, 923, 924, 927, 928, 930, 931]
    assert select_positions(POOL_SIZE, 512, 42) == positions
    assert select_positions(POOL_SIZE, 512, 43) != positions
    with pytest.raises(DataError, match="cannot select 934 of 933"):
        select_positions(POOL_SIZE, 934, 42)


def test_selected_sources_load_the_same_tasks_twice_and_in_file_order(tmp_path):
    pool = tmp_path / "AIME_1983_2024.json"
    pool.write_bytes(_paper_like_files()["AIME_1983_2024.json"])
    source = MathSource(str(pool), "aime", select_count=512, select_seed=42)
    first, again = load_math_tasks([source]), load_math_tasks([source])
    assert [t.task_id for t in first] == [t.task_id for t in again]
    rows = _aime_pool()
    assert [t.task_id for t in first] == [f"aime/{rows[i]['id']}" for i in select_positions(933, 512, 42)]
    assert (first[0].metadata["year"], first[0].metadata["problem_number"]) == ("1983", "1")
    assert first[0].metadata["part"] == "I"
    with pytest.raises(DataError, match=r"AIME_1983_2024\.json: select_count must be .*\[1, 933\]"):
        load_math_tasks([MathSource(str(pool), "aime", select_count=1000)])


def test_overlap_check_covers_the_selection(tmp_path):
    """An eval file sharing problems with the pool (as the authors' aime_eval_32 does) is refused
    for the shared problems the selection trains on, whatever their ids and spacing."""
    pool = tmp_path / "AIME_1983_2024.json"
    pool.write_bytes(_paper_like_files()["AIME_1983_2024.json"])
    train = load_math_tasks([MathSource(str(pool), "aime", select_count=512, select_seed=42)])
    chosen = set(select_positions(933, 512, 42))
    rows = _aime_pool()
    shared = [0, 1, 2, 4, 5]  # 0, 2, 5 are selected; 1 and 4 are not
    eval_rows = [{"prompt": "  " + rows[i]["prompt"].replace(" ", "  "), "answer": rows[i]["answer"],
                  "id": n} for n, i in enumerate(shared)]
    eval_rows.append({"prompt": "A fresh problem?", "answer": "1", "id": 99})
    eval_file = tmp_path / "aime_eval_32.json"
    eval_file.write_text(json.dumps(eval_rows))
    evals = load_math_tasks([MathSource(str(eval_file), "aime_eval")])
    flagged = find_overlap(train, evals)
    assert [re.search(r"eval '(.+?)'", p)[1] for p in flagged] == [
        f"aime_eval/{n}" for n, i in enumerate(shared) if i in chosen]
    with pytest.raises(DataOverlapError, match=r"3 evaluation task\(s\)"):
        check_no_overlap(train, evals)


def test_amc_float_answers_are_graded_as_numbers(tmp_path):
    amc = tmp_path / "amc_eval_32.json"
    amc.write_text(json.dumps([{"prompt": "Find the area.", "answer": 18.0, "source": "amc", "id": "72"},
                               {"prompt": "Find a_2023.", "answer": -1.0, "source": "amc", "id": "58"}]))
    area, sequence = load_math_tasks([MathSource(str(amc), "amc")])
    assert (area.answer, sequence.answer) == ("18", "-1")
    assert grade_math("so the area is \\boxed{18}", area.answer).correct
    assert grade_math("\\boxed{18.0}", area.answer).correct
    assert not grade_math("\\boxed{19}", area.answer).correct
    assert grade_math("\\boxed{-1}", sequence.answer).correct


def _paper_config(name: str):
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), REPO / "configs" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.parametrize("config_name", PAPER_CONFIGS)
def test_paper_configs_read_the_downloaded_files(config_name):
    config = _paper_config(config_name)
    published = {f"{PAPER_MATH.default_dir}/{f.name}" for f in PAPER_MATH.files}
    train_files = config.data.train.files
    eval_files = config.data.eval.files
    assert [f["path"] for f in train_files] == ["data/paper/AIME_1983_2024.json"]
    assert (train_files[0]["select_count"], train_files[0]["select_seed"]) == (512, 42)
    assert [f["path"] for f in eval_files] == ["data/paper/aime_2025.json", "data/paper/amc_eval_32.json"]
    assert {f["path"] for f in [*train_files, *eval_files]} <= published
    assert config.train.eval_samples == 4


class _StopAfterData(Exception):
    pass


@pytest.fixture
def paper_trainer(monkeypatch, tmp_path):
    """The paper config's Trainer in a fresh working directory, stopped right after its data
    checks (where the batch pipeline would start): no model or coach is contacted."""
    from mappa_jax import train

    def stop(*args, **kwargs):
        raise _StopAfterData

    monkeypatch.setattr(train, "TaskPipeline", stop)
    monkeypatch.setenv("GEMINI_API_KEY", "test-key-never-sent")
    monkeypatch.chdir(tmp_path)

    def start(workdir: str):
        config = _paper_config("mathchat_qwen3_4b.py")
        config.workdir = str(tmp_path / workdir)
        with pytest.raises(_StopAfterData):
            train.Trainer(config)
        return json.loads((tmp_path / workdir / "data_selection.json").read_text())
    return train.Trainer, start


def test_paper_run_without_the_files_names_the_file_and_the_command(paper_trainer, tmp_path):
    trainer_cls, _ = paper_trainer
    config = _paper_config("mathchat_qwen3_4b.py")
    config.workdir = str(tmp_path / "run")
    with pytest.raises(DataError, match=r"not found: data/paper/AIME_1983_2024\.json.*`mappa-data paper-math`"):
        trainer_cls(config)


def test_paper_run_records_its_deterministic_selection(paper_trainer, server, tmp_path):
    _, start = paper_trainer
    manifest = _write_manifest(server, tmp_path / "manifest.json")
    assert data_cli.main(["paper-math", "--manifest", str(manifest), "--quiet"]) == 0  # into ./data/paper
    first, second = start("run_a"), start("run_b")
    assert first["train"]["task_ids"] == second["train"]["task_ids"]
    assert first["train"]["tasks_fingerprint"] == second["train"]["tasks_fingerprint"]
    rows = _aime_pool()
    positions = select_positions(933, 512, 42)
    # ids in the order of the run's task source (TFDS orders records by a hash of their key)
    assert sorted(first["train"]["task_ids"]) == sorted(f"aime/{rows[i]['id']}" for i in positions)
    [pool] = first["train"]["files"]
    body = server.files["AIME_1983_2024.json"]
    assert pool["sha256"] == hashlib.sha256(body).hexdigest() and pool["bytes"] == len(body)
    assert (pool["problems_in_file"], pool["selected_positions"]) == (933, positions)
    assert first["eval"]["num_tasks"] == 62
    assert first["eval"]["task_types"] == {"aime2025": 30, "amc": 32}
