"""Tokenizer back ends: SentencePiece and HF tokenizers round trips, special ids, the char tokenizer,
and clear errors. Reference points: the raw back-end libraries and transformers' tokenizer loader."""

import json

import pytest

from orz_jax.template import format_prompt
from orz_jax.tokenizer import (CharTokenizer, HFTokenizer, SentencePieceTokenizer, TokenizerError,
                               load_tokenizer)

MATH_LINES = [
    "Compute 12 + 7 * 3 - 5.",
    "Let x = 4. Then 2x + 3 = 11, so the answer is \\boxed{11}.",
    "<think> 3 * 4 = 12 and 12 - 5 = 7 </think> <answer> \\boxed{7} </answer>",
    "Find all real a such that a^2 - 5a + 6 = 0.",
    "The sum of the first 10 positive integers is 55.",
    "If f(x) = x^3 - x, what is f(2)? It is 6.",
    "A triangle has sides 3, 4 and 5; its area is 6.",
    "The probability of two heads in two fair coin tosses is 1/4.",
]
ROUND_TRIP = ["Compute 9 * 8 - 70 + 1.", "x^2 + 2x + 1 = (x + 1)^2", format_prompt("What is 1/4 + 1/4?")]


# ----------------------------------------------------------------------------------------------
# SentencePiece
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp("spm")
    prefix = str(d / "math")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(MATH_LINES * 20 + ROUND_TRIP), model_prefix=prefix, vocab_size=120,
        model_type="bpe", character_coverage=1.0, normalization_rule_name="identity",
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    return prefix + ".model"


def test_sentencepiece_round_trip_and_special_ids(sp_model):
    import sentencepiece as spm

    tok = load_tokenizer(sp_model)
    assert isinstance(tok, SentencePieceTokenizer)
    ref = spm.SentencePieceProcessor(model_file=sp_model)
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.pad_id == tok.eos_id == 2  # pad_id=-1 in the model: falls back to eos
    assert tok.vocab_size == ref.get_piece_size() == 120
    for text in ROUND_TRIP:
        ids = tok.encode(text)
        assert ids == ref.encode(text, out_type=int)
        assert tok.decode(ids) == text
        assert tok.encode(text, add_bos=True) == [1] + ids
    assert tok.encode_batch(ROUND_TRIP) == [ref.encode(t, out_type=int) for t in ROUND_TRIP]
    assert tok.encode_batch(ROUND_TRIP[:1], add_bos=True) == [[1] + ref.encode(ROUND_TRIP[0], out_type=int)]
    ids = [1] + tok.encode("1 + 1") + [2]
    assert tok.decode(ids) == "1 + 1"
    assert tok.decode(ids, skip_special=False) == "<s>1 + 1</s>"
    assert tok.piece_to_id("</s>") == 2 and tok.piece_to_id("no-such-piece") is None
    assert tok.id_to_piece(2) == "</s>"
    assert {0, 1, 2} <= tok.special_ids


def test_sentencepiece_model_in_directory(sp_model, tmp_path):
    import shutil

    shutil.copy(sp_model, tmp_path / "tokenizer.model")
    tok = load_tokenizer(str(tmp_path))
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.decode(tok.encode(ROUND_TRIP[0])) == ROUND_TRIP[0]


# ----------------------------------------------------------------------------------------------
# HF tokenizers
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A Qwen2.5-shaped directory: byte-level BPE, no BOS (null in tokenizer_config), eos
    <|endoftext|>, a distinct pad token, and a generation_config naming another bos id (which the
    explicit null must override)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("hf")
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|pad|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(MATH_LINES * 20, trainer=trainer)
    raw.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|endoftext|>",
        "pad_token": {"__type": "AddedToken", "content": "<|pad|>", "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False, "special": True}, "tokenizer_class": "PreTrainedTokenizerFast"}))
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": [0, 2]}))
    return d


def test_hf_round_trip_and_special_ids(hf_dir):
    from tokenizers import Tokenizer

    tok = load_tokenizer(str(hf_dir))
    assert isinstance(tok, HFTokenizer)
    raw = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    assert tok.bos_id is None  # explicit null beats generation_config's bos_token_id
    assert tok.eos_id == raw.token_to_id("<|endoftext|>") == 0
    assert tok.pad_id == raw.token_to_id("<|pad|>") == 1
    assert tok.eos_ids == (0, 2)  # generation_config adds <|im_end|> as a second stop id
    assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True)
    for text in ROUND_TRIP + ["unicode: é ∑ 你好 \\boxed{½}"]:
        ids = tok.encode(text)
        assert ids == raw.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
    assert tok.encode_batch(ROUND_TRIP) == [tok.encode(t) for t in ROUND_TRIP]
    with pytest.raises(TokenizerError, match="no BOS"):
        tok.encode("x", add_bos=True)
    ids = tok.encode("1 + 1") + [tok.eos_id]
    assert tok.decode(ids) == "1 + 1"
    assert tok.decode(ids, skip_special=False) == "1 + 1<|endoftext|>"
    assert tok.special_ids == {0, 1, 2}
    assert tok.id_to_piece(0) == "<|endoftext|>" and tok.piece_to_id("<|pad|>") == 1
    # A tokenizer.json path reads the config files beside it the same way.
    assert (load_tokenizer(str(hf_dir / "tokenizer.json")).eos_id, load_tokenizer(str(hf_dir)).pad_id) == (0, 1)


def test_hf_matches_transformers_loader(hf_dir):
    transformers = pytest.importorskip("transformers")
    ref = transformers.PreTrainedTokenizerFast.from_pretrained(str(hf_dir))
    tok = load_tokenizer(str(hf_dir))
    assert (tok.eos_id, tok.pad_id, tok.bos_id) == (ref.eos_token_id, ref.pad_token_id, ref.bos_token_id)
    for text in ROUND_TRIP:
        assert tok.encode(text) == ref(text, add_special_tokens=False)["input_ids"]


def test_hf_special_tokens_map_and_pad_fallback(tmp_path, hf_dir):
    import shutil

    shutil.copy(hf_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}}))
    tok = load_tokenizer(str(tmp_path))
    assert tok.eos_id == 2 and tok.pad_id == 2 and tok.bos_id is None  # no pad anywhere: pad = eos


def test_hf_errors(tmp_path, hf_dir):
    import shutil

    shutil.copy(hf_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    with pytest.raises(TokenizerError, match="no eos token"):  # nothing names an eos
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(TokenizerError, match="'<\\|nope\\|>' is not in the vocabulary"):
        load_tokenizer(str(tmp_path))
    bad = tmp_path / "broken" / "tokenizer.json"
    bad.parent.mkdir()
    bad.write_text("{ not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizers JSON"):
        load_tokenizer(str(bad))


# ----------------------------------------------------------------------------------------------
# Char tokenizer, loading errors
# ----------------------------------------------------------------------------------------------


def test_char_tokenizer_save_load(tmp_path):
    tok = CharTokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == 4 + 96  # specials + newline + printable ASCII
    text = format_prompt("Compute 12 + 7 * 3 - 5.", "plain")
    ids = tok.encode(text)
    assert len(ids) == len(text)  # one token per character
    assert ids == [4 + ("\n" + "".join(map(chr, range(32, 127)))).index(c) for c in text]
    assert tok.decode(ids) == text
    assert tok.encode("aé")[1] == tok.piece_to_id("<unk>") == 3
    tok.save(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    back = load_tokenizer(str(tmp_path))
    assert (back.pad_id, back.bos_id, back.eos_id, back.vocab_size) == (0, 1, 2, 100)
    assert back.encode(text, add_bos=True) == [1] + ids
    assert back.decode([1] + ids + [2], skip_special=False) == "<bos>" + text + "<eos>"
    assert back.decode([1] + ids + [2]) == text


def test_load_errors(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer path not found.*nowhere"):
        load_tokenizer(str(tmp_path / "nowhere"))
    with pytest.raises(TokenizerError, match="neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(TokenizerError, match="unknown tokenizer file type"):
        load_tokenizer(str(tmp_path / "vocab.txt"))
    (tmp_path / "bad.model").write_bytes(b"\x00garbage")
    with pytest.raises(TokenizerError, match="not a valid SentencePiece model"):
        load_tokenizer(str(tmp_path / "bad.model"))
