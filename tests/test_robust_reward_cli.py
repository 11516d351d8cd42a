"""``python -m orz_jax.reward score`` input handling (issue 19, failure 11): a non-UTF-8 line is a one-line
error with its line number; a bad row stops the run naming it, or with ``--skip-bad`` is left out and
counted; an unwritable output is found before any scoring."""

from __future__ import annotations

import json

import pytest

from orz_jax.reward.cli import InputError, main, read_jsonl


def _row(box: str, answer: str) -> bytes:
    return json.dumps({"response": f"<answer>\\boxed{{{box}}}</answer>", "answer": answer}).encode() + b"\n"


def test_non_utf8_line_names_its_line(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_bytes(_row("1", "1") + b'{"response": "caf\xe9", "answer": "1"}\n')
    assert main(["score", str(src)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {src}:2: not valid UTF-8 (byte 0xe9 at column 18)"]


def test_bad_rows_stop_the_run_or_are_skipped_and_counted(tmp_path, capsys):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(_row("1", "1") + b"{not json\n" + b"\xff\xfe\n" + b'{"response": "\\ud800", "answer": "1"}\n'
                    + b"\n" + _row("2", "3"))
    with pytest.raises(InputError, match=r"in.jsonl:2: not valid JSON"):
        read_jsonl(str(src))
    assert main(["score", str(src), str(dst)]) == 2
    assert f"{src}:2: not valid JSON" in capsys.readouterr().err and not dst.exists()

    skipped: list[str] = []
    assert len(read_jsonl(str(src), skipped)) == 2
    assert [m.split(": ", 1)[0] for m in skipped] == [f"{src}:{n}" for n in (2, 3, 4)]
    assert "unpaired UTF-16 surrogate" in skipped[2]

    assert main(["score", str(src), str(dst), "--skip-bad", "--set", "num_workers=1"]) == 0
    out = [json.loads(line) for line in dst.read_text(encoding="utf-8").splitlines()]
    assert [(o["extracted"], o["reward"]) for o in out] == [("1", 1.0), ("2", 0.0)]
    err = capsys.readouterr().err
    assert f"skipped 3 bad line(s) (--skip-bad); the first: {src}:2: not valid JSON" in err


@pytest.mark.parametrize("where", ["missing_dir/out.jsonl", "a_directory"])
def test_unwritable_output_is_found_before_scoring(tmp_path, capsys, monkeypatch, where):
    (tmp_path / "a_directory").mkdir()
    src = tmp_path / "in.jsonl"
    src.write_bytes(_row("1", "1"))

    def no_scoring(*args, **kwargs):
        raise AssertionError("the scorer started before the output was checked")

    monkeypatch.setattr("orz_jax.reward.cli.RewardScorer", no_scoring)
    assert main(["score", str(src), str(tmp_path / where)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / where}: "), err
