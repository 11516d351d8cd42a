"""One tokenizer interface over Hugging Face ``tokenizers`` and SentencePiece.

    tok = load_tokenizer("/models/Qwen2.5-7B")      # a dir with tokenizer.json (+ tokenizer_config.json)
    tok = load_tokenizer("/models/x/tokenizer.json") # a bare tokenizer.json
    tok = load_tokenizer("/models/y/tokenizer.model")# a SentencePiece model
    ids = tok.encode("1 + 1 = 2")                    # list[int], never adds special tokens unless asked
    text = tok.decode(ids)

Special ids: ``bos_id`` is None when the model has no BOS (Qwen2.5 base has none); ``eos_id`` is the
end-of-text id the rollout stops on; ``pad_id`` falls back to ``eos_id`` when the tokenizer defines
no pad token (padding positions are masked everywhere, so the value only has to be a valid id).

:class:`CharTokenizer` is a tiny character-level vocabulary for the built-in demo task. It is an
ordinary ``tokenizers`` model, so ``save(dir)`` writes a normal HF-style tokenizer directory that
:func:`load_tokenizer` (or ``transformers.PreTrainedTokenizerFast``) reads back.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Optional, Sequence

__all__ = ["Tokenizer", "HFTokenizer", "SentencePieceTokenizer", "CharTokenizer", "TokenizerError",
           "load_tokenizer"]


class TokenizerError(ValueError):
    """A tokenizer path that is missing, of an unknown kind, or inconsistent; the message names it."""


class Tokenizer:
    """The common interface. Subclasses implement the five primitives below."""

    bos_id: Optional[int]
    eos_id: int
    pad_id: int
    # Every id that ends a sequence (eos_id first). generation_config.json may list several
    # (e.g. instruct models end turns with <|im_end|> as well as <|endoftext|>).
    eos_ids: tuple[int, ...]

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """``text`` -> token ids. No special tokens are added, except BOS when ``add_bos`` and the
        model has one (asking for a BOS the model lacks is an error, not a silent no-op)."""
        ids = self._encode(text)
        if add_bos:
            if self.bos_id is None:
                raise TokenizerError("encode(add_bos=True) but this tokenizer has no BOS token")
            ids = [self.bos_id] + ids
        return ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
        return [self.encode(t, add_bos=add_bos) for t in texts]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        raise NotImplementedError

    def id_to_piece(self, token_id: int) -> str:
        raise NotImplementedError

    def piece_to_id(self, piece: str) -> Optional[int]:
        """The id of a vocabulary entry (e.g. a special token ``"<|endoftext|>"``), None if absent."""
        raise NotImplementedError

    @property
    def special_ids(self) -> frozenset[int]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id})")


# ----------------------------------------------------------------------------------------------
# Hugging Face tokenizers
# ----------------------------------------------------------------------------------------------


def _token_content(value: Any) -> Optional[str]:
    """tokenizer_config.json writes special tokens as a string or as {"content": ..., ...}."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: str) -> Optional[dict]:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read as JSON: {e}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object at top level, got {type(data).__name__}")
    return data


_ENCODE_CHUNK = 2048  # texts per encode_batch call


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` (tokenizer.json) plus the special tokens named by the files beside it.

    Special-token lookup order, first hit wins per token: tokenizer_config.json, then
    special_tokens_map.json, then generation_config.json (ids). A key present with value null
    (Qwen2.5's ``"bos_token": null``) means "none" and stops the search for that token.
    """

    def __init__(self, tok: Any, *, bos: Optional[str] = None, eos: Optional[str] = None,
                 pad: Optional[str] = None, extra_eos_ids: Sequence[int] = (), source: str = "<memory>"):
        self._tok = tok
        self.source = source

        def resolve(name: str, piece: Optional[str]) -> Optional[int]:
            if piece is None:
                return None
            tid = tok.token_to_id(piece)
            if tid is None:
                raise TokenizerError(f"{source}: {name} token {piece!r} is not in the vocabulary")
            return tid

        self.bos_id = resolve("bos", bos)
        eos_id = resolve("eos", eos)
        if eos_id is None:
            eos_id = next(iter(extra_eos_ids), None)
        if eos_id is None:
            raise TokenizerError(
                f"{source}: no eos token found (looked in tokenizer_config.json, special_tokens_map.json, "
                f"generation_config.json); the rollout needs one to know where a response ends")
        self.eos_id = eos_id
        pad_id = resolve("pad", pad)
        self.pad_id = eos_id if pad_id is None else pad_id
        self.eos_ids = tuple(dict.fromkeys([eos_id, *extra_eos_ids]))
        self._special = frozenset(
            tid for tid, added in tok.get_added_tokens_decoder().items() if added.special)

    @classmethod
    def from_path(cls, path: str) -> "HFTokenizer":
        """``path``: a directory holding tokenizer.json, or a tokenizer.json file."""
        from tokenizers import Tokenizer as _RawTokenizer

        if os.path.isdir(path):
            directory, tok_file = path, os.path.join(path, "tokenizer.json")
        else:
            directory, tok_file = os.path.dirname(path) or ".", path
        if not os.path.isfile(tok_file):
            raise TokenizerError(f"{tok_file}: not found")
        try:
            raw = _RawTokenizer.from_file(tok_file)
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"{tok_file}: not a valid tokenizers JSON file: {e}") from None

        found: dict[str, Optional[str]] = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            cfg = _read_json(os.path.join(directory, name)) or {}
            for key in ("bos", "eos", "pad"):
                if key not in found and f"{key}_token" in cfg:
                    found[key] = _token_content(cfg[f"{key}_token"])
        gen = _read_json(os.path.join(directory, "generation_config.json")) or {}

        def gen_ids(key: str) -> list[int]:
            v = gen.get(key)
            if v is None:
                return []
            return [int(x) for x in (v if isinstance(v, list) else [v])]

        eos_extra = gen_ids("eos_token_id")
        if "bos" not in found and gen_ids("bos_token_id"):
            found["bos"] = raw.id_to_token(gen_ids("bos_token_id")[0])
        if "pad" not in found and gen_ids("pad_token_id"):
            found["pad"] = raw.id_to_token(gen_ids("pad_token_id")[0])
        return cls(raw, bos=found.get("bos"), eos=found.get("eos"), pad=found.get("pad"),
                   extra_eos_ids=eos_extra, source=tok_file)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _encode(self, text: str) -> list[int]:
        # add_special_tokens=False: a post-processor that prepends BOS (Llama) must not fire; BOS is
        # explicit via encode(add_bos=True).
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
        # The Rust side encodes a batch on all cores, which is what makes tokenizing a whole training
        # file at pipeline-build time affordable. In chunks: an Encoding also holds offsets, strings
        # and masks (~100 bytes a token), so one call over 57k ORZ prompts would peak at gigabytes.
        texts = list(texts)
        out = []
        for start in range(0, len(texts), _ENCODE_CHUNK):
            out.extend(e.ids for e in self._tok.encode_batch(texts[start:start + _ENCODE_CHUNK],
                                                             add_special_tokens=False))
        if add_bos:
            if self.bos_id is None:
                raise TokenizerError("encode(add_bos=True) but this tokenizer has no BOS token")
            out = [[self.bos_id] + ids for ids in out]
        return out

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def id_to_piece(self, token_id: int) -> str:
        piece = self._tok.id_to_token(int(token_id))
        if piece is None:
            raise TokenizerError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        return piece

    def piece_to_id(self, piece: str) -> Optional[int]:
        return self._tok.token_to_id(piece)

    @property
    def special_ids(self) -> frozenset[int]:
        return self._special

    def save(self, directory: str) -> None:
        """Write tokenizer.json + tokenizer_config.json (bos/eos/pad) into ``directory``."""
        os.makedirs(directory, exist_ok=True)
        self._tok.save(os.path.join(directory, "tokenizer.json"))
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None if self.bos_id is None else self.id_to_piece(self.bos_id),
            "eos_token": self.id_to_piece(self.eos_id),
            "pad_token": self.id_to_piece(self.pad_id),
            "add_bos_token": False,
            "model_max_length": 1 << 30,
        }
        with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2)


# ----------------------------------------------------------------------------------------------
# SentencePiece
# ----------------------------------------------------------------------------------------------


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model``. Special ids come from the model itself (-1 there = absent)."""

    def __init__(self, path: str):
        import sentencepiece as spm

        if not os.path.isfile(path):
            raise TokenizerError(f"{path}: not found")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=path)
        except Exception as e:  # sentencepiece raises OSError/RuntimeError depending on version
            raise TokenizerError(f"{path}: not a valid SentencePiece model: {e}") from None
        self.source = path

        def opt(i: int) -> Optional[int]:
            return None if i < 0 else i

        self.bos_id = opt(self._sp.bos_id())
        eos = opt(self._sp.eos_id())
        if eos is None:
            raise TokenizerError(f"{path}: the SentencePiece model has no eos piece (eos_id=-1)")
        self.eos_id = eos
        pad = opt(self._sp.pad_id())
        self.pad_id = eos if pad is None else pad
        self.eos_ids = (eos,)
        n = self._sp.get_piece_size()
        self._special = frozenset(i for i in range(n) if self._sp.is_control(i) or self._sp.is_unknown(i))

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def _encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text, out_type=int))

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
        # sentencepiece encodes a list on several threads; add_bos goes through the checked path.
        if add_bos:
            return super().encode_batch(texts, add_bos=True)
        return [list(ids) for ids in self._sp.encode(list(texts), out_type=int)]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            return self._sp.decode([i for i in ids if i not in self._special])
        # sentencepiece drops control pieces when decoding; to keep them, decode the runs of
        # ordinary pieces and splice the special pieces in between, as HF does.
        out, run = [], []
        for i in ids:
            if i in self._special:
                if run:
                    out.append(self._sp.decode(run))
                    run = []
                out.append(self._sp.id_to_piece(i))
            else:
                run.append(i)
        if run:
            out.append(self._sp.decode(run))
        return "".join(out)

    def id_to_piece(self, token_id: int) -> str:
        if not 0 <= int(token_id) < self.vocab_size:
            raise TokenizerError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        return self._sp.id_to_piece(int(token_id))

    def piece_to_id(self, piece: str) -> Optional[int]:
        tid = self._sp.piece_to_id(piece)
        # piece_to_id maps unknown pieces to unk; only report a hit when the piece really is that entry.
        return tid if self._sp.id_to_piece(tid) == piece else None

    @property
    def special_ids(self) -> frozenset[int]:
        return self._special


# ----------------------------------------------------------------------------------------------
# Character-level tokenizer for the demo task
# ----------------------------------------------------------------------------------------------

# Printable ASCII (letters, digits, punctuation incl. the template's < > / \ { }) plus newline.
DEFAULT_CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
CHAR_SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")  # ids 0..3


class CharTokenizer(HFTokenizer):
    """One token per character: ids 0..3 are <pad> <bos> <eos> <unk>, then one id per char of
    ``chars``. Characters outside ``chars`` encode to <unk>. Built on ``tokenizers`` (WordLevel
    model over single characters, Fuse decoder), so ``save`` gives an ordinary tokenizer dir."""

    def __init__(self, chars: str = DEFAULT_CHARS):
        from tokenizers import Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as _RawTokenizer

        if len(set(chars)) != len(chars):
            raise TokenizerError("CharTokenizer: chars contains duplicates")
        vocab = {s: i for i, s in enumerate(CHAR_SPECIALS)}
        for c in chars:
            vocab[c] = len(vocab)
        raw = _RawTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        raw.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every char
        raw.decoder = decoders.Fuse()  # join pieces without the WordLevel default space
        raw.add_special_tokens(list(CHAR_SPECIALS))
        super().__init__(raw, bos="<bos>", eos="<eos>", pad="<pad>", source="CharTokenizer")


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def load_tokenizer(path: str) -> Tokenizer:
    """Load a tokenizer from a directory (tokenizer.json preferred, else tokenizer.model), a
    tokenizer.json file (any ``*.json``), or a SentencePiece ``*.model`` file."""
    if path is None or not os.path.exists(path):
        raise TokenizerError(f"tokenizer path not found: {path!r}")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            return HFTokenizer.from_path(path)
        if os.path.isfile(os.path.join(path, "tokenizer.model")):
            return SentencePieceTokenizer(os.path.join(path, "tokenizer.model"))
        raise TokenizerError(
            f"{path}: directory holds neither tokenizer.json nor tokenizer.model "
            f"(found: {sorted(os.listdir(path))[:20]})")
    if path.endswith(".json"):
        return HFTokenizer.from_path(path)
    if path.endswith(".model"):
        return SentencePieceTokenizer(path)
    raise TokenizerError(f"{path}: unknown tokenizer file type; expected a directory, a tokenizer.json "
                         f"or a SentencePiece .model")
