"""Data pipeline on ORZ records: record counts, determinism, resume equality, host sharding, long-prompt
filtering, mixture weights, bad-data errors, and the synthetic task (answers checked with Python's own
``eval``). The char tokenizer makes prompt lengths countable by hand: one token per character.

Every data test runs on the real ORZ records shipped in tests/fixtures/orz (ORZ's schemas, a few dozen
records). When ORZ's larger files are present in ../shared/data/orz (or $ORZ_SHARED_DATA) the same tests also
run on them (the ``[shared]`` variants), as extra coverage: e.g. all 4,510 training records parse. Without them
those variants are not generated, so nothing skips."""

import dataclasses
import json
from collections import Counter
from pathlib import Path

import pytest

from conftest import FIXTURE_DATA, SHARED_DATA
from orz_jax.config import Config, ConfigError, DataFileConfig, SyntheticTaskConfig
from orz_jax.data import (DataError, build_train_pipeline, generate_synthetic, load_eval_set, load_records,
                          prepare_train_dataset)
from orz_jax.data import pipeline
from orz_jax.template import format_prompt
from orz_jax.tokenizer import DEFAULT_CHARS, CharTokenizer


@dataclasses.dataclass(frozen=True)
class OrzData:
    """One set of ORZ files: two training files (57k-like, 72k-like) and the three eval files, with counts."""

    dir: Path
    f57k: Path
    f72k: Path
    counts: dict  # file name -> records


FIXTURES = OrzData(FIXTURE_DATA, FIXTURE_DATA / "orz_math_57k_collected.sample.json",
                   FIXTURE_DATA / "orz_math_72k_collection_extended.sample.json",
                   {"orz_math_57k_collected.sample.json": 15, "orz_math_72k_collection_extended.sample.json": 12,
                    "eval_math500.json": 10, "eval_aime2024.json": 10, "eval_gpqa_diamond.json": 8})
SHARED = OrzData(SHARED_DATA, SHARED_DATA / "train_orz_math_57k_collected.PARTIAL_first1785.json",
                 SHARED_DATA / "train_orz_math_72k_collection_extended.PARTIAL_first2725.json",
                 {"train_orz_math_57k_collected.PARTIAL_first1785.json": 1785,
                  "train_orz_math_72k_collection_extended.PARTIAL_first2725.json": 2725,
                  "eval_math500.json": 500, "eval_aime2024.json": 30, "eval_gpqa_diamond.json": 198})
# The larger files join as a second parameter only where they exist: a fresh clone runs every test on the
# fixtures and skips nothing.
DATASETS = [pytest.param(FIXTURES, id="fixtures")] + (
    [pytest.param(SHARED, id="shared")] if SHARED_DATA.is_dir() else [])
with_data = pytest.mark.parametrize("data", DATASETS)
TOK = CharTokenizer()


def make_cfg(files=(), weights=None, *, per_iter=8, limit=4096, template="plain", epochs=None, seed=0):
    cfg = Config()
    d = cfg.data
    d.source = "files" if files else "synthetic"
    d.train_files = [DataFileConfig(path=str(f), weight=w) for f, w in zip(files, weights or [1.0] * len(files))]
    d.prompts_per_iter, d.template, d.num_epochs, d.shuffle_seed = per_iter, template, epochs, seed
    d.synthetic = SyntheticTaskConfig(num_train=200, num_eval=50, min_ops=1, max_ops=3, max_operand=20, seed=3)
    cfg.rollout.max_prompt_len = limit
    return cfg


def take(it, n):
    return [next(it) for _ in range(n)]


def keys(batch):
    return [(s, i) for s, i in zip(batch.sources, batch.indices)]


# ----------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------


@with_data
def test_record_counts_and_fields(data):
    for name, count in data.counts.items():
        check_records(data.dir / name, count)


def check_records(path: Path, count: int):
    name = path.name
    loaded = load_records(str(path))
    assert len(loaded.records) == count and loaded.num_skipped == 0
    raw = json.loads(path.read_text())
    for i in (0, len(raw) // 2, len(raw) - 1):
        rec = loaded.records[i]
        assert rec.index == i and rec.source == name[: -len(".json")]
        if not name.startswith("eval_"):
            assert (rec.question, rec.answer) == (raw[i][0]["value"], raw[i][1]["ground_truth"]["value"])
        else:
            assert (rec.question, rec.answer) == (raw[i]["prompt"][0]["value"], raw[i]["final_answer"])
        assert rec.choices == raw[i].get("choices") if isinstance(raw[i], dict) else rec.choices is None


@with_data
def test_eval_sets(data):
    cfg = make_cfg(template="orz", limit=16384)  # the longest GPQA prompt is over 4096 chars
    for name in ("eval_math500.json", "eval_aime2024.json", "eval_gpqa_diamond.json"):
        items = load_eval_set(str(data.dir / name), cfg, TOK)
        assert len(items) == data.counts[name]
        prompt_ids, answer, question = items[7]  # unpacks as the module contract's triple
        text = format_prompt(question, "orz")
        assert prompt_ids[0] == TOK.bos_id  # the orz template starts with BOS when the tokenizer has one
        assert len(prompt_ids) == 1 + len(text)  # one token per char; <unk> (skipped on decode) for non-ASCII
        assert TOK.decode(prompt_ids[1:]) == "".join(c for c in text if c in DEFAULT_CHARS)
        assert answer == json.loads((data.dir / name).read_text())[7]["final_answer"]
    gpqa = load_eval_set(str(data.dir / "eval_gpqa_diamond.json"), cfg, TOK)
    assert all(set(it.choices) == {"A", "B", "C", "D"} and it.answer in "ABCD" for it in gpqa)
    synth = load_eval_set("synthetic", cfg, TOK)
    assert [it.question for it in synth] == [r.question for r in generate_synthetic(cfg.data.synthetic)[1]]
    assert TOK.decode(synth[0].prompt_ids[1:]) == format_prompt(synth[0].question, "orz")


# ----------------------------------------------------------------------------------------------
# Pipeline: determinism, epochs, resume
# ----------------------------------------------------------------------------------------------


@with_data
def test_deterministic_for_a_seed(data):
    F57K = data.f57k
    cfg = make_cfg([F57K])
    a = [keys(b) for b in take(build_train_pipeline(cfg, TOK, process_index=0, process_count=1), 5)]
    b = [keys(b) for b in take(build_train_pipeline(cfg, TOK, process_index=0, process_count=1), 5)]
    c = [keys(b) for b in take(build_train_pipeline(make_cfg([F57K], seed=1), TOK, process_index=0,
                                                    process_count=1), 5)]
    assert a == b and a != c
    assert a[0] != [(F57K.stem, i) for i in range(8)]  # shuffled, not file order


def test_epochs_are_reshuffled_permutations():
    cfg = make_cfg(per_iter=10, epochs=2)  # synthetic: 200 train prompts -> 20 batches per epoch
    batches = list(build_train_pipeline(cfg, TOK, process_index=0, process_count=1))
    assert len(batches) == 40 and all(len(b) == 10 for b in batches)
    order = [q for b in batches for q in b.questions]
    train = [r.question for r in generate_synthetic(cfg.data.synthetic)[0]]
    assert sorted(order[:200]) == sorted(order[200:]) == sorted(train)  # each epoch sees every prompt once
    assert order[:200] != order[200:]  # ... in a new order
    b = batches[0]
    for ids, q, a in zip(b.prompt_ids, b.questions, b.answers):
        assert TOK.decode(ids) == format_prompt(q, "plain")
        assert a == next(r.answer for r in generate_synthetic(cfg.data.synthetic)[0] if r.question == q)


@with_data
def test_resume_yields_the_same_batches(data):
    cfg = make_cfg([data.f57k, data.f72k], [1.0, 2.0])
    it = build_train_pipeline(cfg, TOK, process_index=0, process_count=1)
    take(it, 7)
    state = json.loads(json.dumps(it.get_state()))  # as it would travel through a checkpoint
    expected = [keys(b) for b in take(it, 6)]
    resumed = build_train_pipeline(cfg, TOK, process_index=0, process_count=1)
    resumed.set_state(state)
    got = take(resumed, 6)
    assert [keys(b) for b in got] == expected
    fresh = build_train_pipeline(cfg, TOK, process_index=0, process_count=1)
    assert [keys(b) for b in take(fresh, 13)[7:]] == expected  # = the uninterrupted run


def test_bare_names_are_read_from_data_dir():
    """data.train_files given as bare names are opened in data.dir (the ORZ configs' layout); the prompts'
    source names stay the files' names."""
    cfg = make_cfg([FIXTURES.f57k.name, FIXTURES.f72k.name], per_iter=4)
    cfg.data.dir = str(FIXTURES.dir)
    td = prepare_train_dataset(cfg, TOK, process_index=0, process_count=1)
    assert [st.name for st in td.stats] == [str(FIXTURES.f57k), str(FIXTURES.f72k)]
    assert [st.records for st in td.stats] == [15, 12]
    assert {s for b in take(iter(td.dataset), 10) for s in b.sources} == {FIXTURES.f57k.stem, FIXTURES.f72k.stem}


def test_resume_through_an_orbax_checkpoint(tmp_path):
    """The iterator goes into an Orbax checkpoint with Grain's own handler (one JSON per process)."""
    grain = pytest.importorskip("grain")
    ocp = pytest.importorskip("orbax.checkpoint")
    cfg = make_cfg()
    it = build_train_pipeline(cfg, TOK, process_index=0, process_count=1)
    take(it, 5)
    mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"))
    mngr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    expected = [b.questions for b in take(it, 4)]
    resumed = build_train_pipeline(cfg, TOK, process_index=0, process_count=1)
    mngr.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    assert [b.questions for b in take(resumed, 4)] == expected
    mngr.close()


# ----------------------------------------------------------------------------------------------
# Sharding, filtering, mixture
# ----------------------------------------------------------------------------------------------


@with_data
def test_host_shards_are_disjoint_and_cover_the_data(data):
    F57K, n = data.f57k, data.counts[data.f57k.name]
    assert n % 3 == 0  # so that the even split drops nothing and the shards cover the file
    count = 3
    cfg = make_cfg([F57K], per_iter=count, epochs=1)  # 1 prompt per host per batch: nothing dropped
    shards = []
    for pi in range(count):
        td = prepare_train_dataset(cfg, TOK, process_index=pi, process_count=count)
        assert td.batch_size == 1
        shard = [k for b in build_train_pipeline(cfg, TOK, process_index=pi, process_count=count) for k in keys(b)]
        assert len(shard) == len(set(shard)) == n // count
        shards.append(set(shard))
    assert not (shards[0] & shards[1]) and not (shards[0] & shards[2]) and not (shards[1] & shards[2])
    assert set().union(*shards) == {(F57K.stem, i) for i in range(n)}  # all covered
    with pytest.raises(DataError, match="must divide evenly over 3"):
        prepare_train_dataset(make_cfg([F57K], per_iter=8), TOK, process_index=0, process_count=3)


@with_data
def test_long_prompt_filter_truncate_error(data):
    F57K, n = data.f57k, data.counts[data.f57k.name]
    limit = 1024
    raw = json.loads(F57K.read_text())
    lengths = [1 + len(format_prompt(r[0]["value"], "orz")) for r in raw]  # BOS + 1 token per char
    n_long = sum(n > limit for n in lengths)
    first_long = next(i for i, n in enumerate(lengths) if n > limit)
    assert 0 < n_long < len(raw)

    cfg = make_cfg([F57K], limit=limit, template="orz", epochs=1, per_iter=1)
    td = prepare_train_dataset(cfg, TOK, process_index=0, process_count=1)
    (st,) = td.stats
    assert (st.records, st.dropped_long, st.kept, st.truncated_long) == (n, n_long, n - n_long, 0)
    seen = [k for b in build_train_pipeline(cfg, TOK, process_index=0, process_count=1) for k in keys(b)]
    assert sorted(i for _, i in seen) == [i for i, n in enumerate(lengths) if n <= limit]

    cfg.rollout.long_prompt = "left_truncate"
    td = prepare_train_dataset(cfg, TOK, process_index=0, process_count=1)
    assert (td.stats[0].truncated_long, td.stats[0].dropped_long, td.stats[0].kept) == (n_long, 0, n)
    it = iter(td.dataset)
    for b in take(it, min(200, n)):
        text = format_prompt(raw[b.indices[0]][0]["value"], "orz")
        assert b.prompt_ids[0] == TOK.encode(text, add_bos=True)[-limit:]  # kept the end, where the cue is
        assert len(b.prompt_ids[0]) == min(limit, 1 + len(text))

    cfg.rollout.long_prompt = "error"
    with pytest.raises(DataError, match=f"{F57K.name}: record {first_long}: prompt is {lengths[first_long]} tokens"):
        build_train_pipeline(cfg, TOK, process_index=0, process_count=1)


@with_data
@pytest.mark.parametrize("weights", [(1.0, 3.0), (0.3, 0.7)])
def test_mixture_weights(data, weights, monkeypatch):
    F57K, F72K = data.f57k, data.f72k
    # Records are tokenized in chunks (pipeline._CHUNK per encode_batch call); chunks of 5 put several chunk
    # boundaries inside even the fixture files, where the real files cross the default 1024.
    chunk = 5 if data is FIXTURES else pipeline._CHUNK
    monkeypatch.setattr(pipeline, "_CHUNK", chunk)
    cfg = make_cfg([F57K, F72K], list(weights), per_iter=10)
    it = build_train_pipeline(cfg, TOK, process_index=0, process_count=1)
    # Grain's mix is deterministic, so a few hundred draws pin the share; on the small fixture files each draw
    # also costs a reshuffled epoch every few batches (Grain: ~7 ms a draw), hence fewer draws there.
    batches = take(it, 50 if data is FIXTURES else 200)
    counts = Counter(s for b in batches for s in b.sources)  # 500 or 2000 draws
    # Every prompt is its own record's question, also past the first encode chunks (1024 records).
    raw = {F57K.stem: json.loads(F57K.read_text()), F72K.stem: json.loads(F72K.read_text())}
    assert max(i for b in batches for i in b.indices) > 2 * chunk
    for b in batches[:50]:
        for ids, q, src, i in zip(b.prompt_ids, b.questions, b.sources, b.indices):
            assert q == raw[src][i][0]["value"]
            assert TOK.decode(ids) == "".join(c for c in format_prompt(q, "plain") if c in DEFAULT_CHARS)
    share = counts[F57K.stem] / sum(counts.values())
    assert share == pytest.approx(weights[0] / sum(weights), abs=0.01)


# ----------------------------------------------------------------------------------------------
# Bad data
# ----------------------------------------------------------------------------------------------

GOOD = [{"from": "human", "value": "What is 1+1?"}, {"from": "assistant", "ground_truth": {"value": "2"}}]


def write(tmp_path, name, content):
    p = tmp_path / name
    p.write_text(content if isinstance(content, str) else json.dumps(content))
    return p


@pytest.mark.parametrize("content, message", [
    ("[" + json.dumps(GOOD) + ",", r"not valid JSON \(line 1"),
    ("", r"not valid JSON"),
    ("[]", r"the file holds no records"),
    ({"a": 1}, r"expected a JSON array"),
    ([GOOD, GOOD, [{"from": "human"}, GOOD[1]]], r"record 2: missing prompt"),
    ([GOOD, [GOOD[0], {"from": "assistant"}]], r"record 1: missing answer"),
    ([GOOD, [GOOD[0], {"from": "assistant", "ground_truth": {"value": 2}}]],
     r"record 1: answer \('ground_truth.value'\) must be a string, got int"),
    ([{"prompt": [{"from": "user", "value": "q"}], "final_answer": None}], r"record 0: answer .* got NoneType"),
    ([GOOD, "just text"], r"record 1: record must be a list .* or an object"),
])
def test_bad_data_names_file_and_record(tmp_path, content, message):
    path = write(tmp_path, "bad.json", content)
    cfg = make_cfg([path])
    with pytest.raises(DataError, match=f"bad.json: {message}"):
        build_train_pipeline(cfg, TOK, process_index=0, process_count=1)  # at build time, not mid-epoch
    with pytest.raises(DataError, match="bad.json"):
        load_eval_set(str(path), cfg, TOK)


def test_bad_records_skipped_when_asked(tmp_path, caplog):
    recs = [GOOD, [GOOD[0]], GOOD, [GOOD[0], {"ground_truth": {"value": 3}}], GOOD]
    path = write(tmp_path, "mixed.json", recs)
    cfg = make_cfg([path], per_iter=1, epochs=1)
    with pytest.raises(DataError, match="mixed.json: record 1"):
        prepare_train_dataset(cfg, TOK, process_index=0, process_count=1)
    cfg.data.on_bad_record = "skip"
    with caplog.at_level("WARNING"):
        td = prepare_train_dataset(cfg, TOK, process_index=0, process_count=1)
    assert (td.stats[0].skipped_bad, td.stats[0].kept) == (2, 3)
    assert "skipped 2 of 5 bad records" in caplog.text
    assert sorted(i for b in td.dataset for i in b.indices) == [0, 2, 4]
    write(tmp_path, "allbad.json", [[GOOD[0]]])
    with pytest.raises(DataError, match="allbad.json: all 1 records are bad"):
        load_records(str(tmp_path / "allbad.json"), "skip")
    with pytest.raises(DataError, match="missing.json: data file not found"):
        load_records(str(tmp_path / "missing.json"))


# ----------------------------------------------------------------------------------------------
# Synthetic task
# ----------------------------------------------------------------------------------------------


def test_synthetic_task():
    cfg = SyntheticTaskConfig(num_train=3000, num_eval=300, min_ops=1, max_ops=4, max_operand=30, seed=11)
    train, ev = generate_synthetic(cfg)
    assert (len(train), len(ev)) == (3000, 300)
    ops_seen = Counter()
    for r in train + ev:
        assert r.question.startswith("Compute ") and r.question.endswith(".")
        expr = r.question[len("Compute "):-1]
        assert int(r.answer) == eval(expr, {"__builtins__": {}})  # independent: Python's precedence rules
        tokens = expr.split(" ")
        n_ops = len(tokens) // 2
        assert 1 <= n_ops <= 4 and all(1 <= int(x) <= 30 for x in tokens[::2])
        ops_seen[n_ops] += 1
    assert set(ops_seen) == {1, 2, 3, 4}
    qs = [r.question for r in train + ev]
    assert len(set(qs)) == len(qs)  # unique, so train and eval are disjoint
    assert [r.index for r in ev] == list(range(300)) and [r.index for r in train] == list(range(3000))
    again_train, again_ev = generate_synthetic(cfg)
    assert again_train == train and again_ev == ev
    bigger_train, same_ev = generate_synthetic(SyntheticTaskConfig(**{**vars(cfg), "num_train": 4000}))
    assert same_ev == ev  # the eval split does not move when the training split grows
    other, _ = generate_synthetic(SyntheticTaskConfig(**{**vars(cfg), "seed": 12}))
    assert [r.question for r in other] != [r.question for r in train]
    # 1 op, operands 1..3: 3 * 3 * 3 = 27 distinct questions exist.
    tiny = SyntheticTaskConfig(num_train=20, num_eval=7, min_ops=1, max_ops=1, max_operand=3)
    assert len({r.question for r in sum(generate_synthetic(tiny), [])}) == 27
    with pytest.raises(ConfigError, match="28 unique questions requested, but only 27"):
        generate_synthetic(SyntheticTaskConfig(**{**vars(tiny), "num_train": 21}))
