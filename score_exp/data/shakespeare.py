"""Tiny Shakespeare as token memmaps, the way nanoGPT's ``data/shakespeare*/prepare.py`` does it.

Two tokenisers:

- ``char``: the distinct characters of the text, sorted (65 for Tiny Shakespeare), as in
  nanoGPT's ``shakespeare_char``; the vocabulary is stored in ``meta.json`` (nanoGPT: ``meta.pkl``).
- ``gpt2``: GPT-2 BPE through ``tiktoken``, built offline from the two registered GPT-2 files
  (``vocab.bpe`` and ``encoder.json``), so it never needs the network.

The first 90% of the characters are the training split and the last 10% the validation split;
each split is encoded once into a ``uint16`` file under the cache folder, in a directory keyed by
the text's hash, the tokeniser and the split, so a different text or tokeniser never reuses
stale files. Plain NumPy/tiktoken: no torch, no Lightning.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from score_exp.errors import ConfigError, DataError
from score_exp.runs.files import mkdtemp_shared

log = logging.getLogger(__name__)

TOKENIZERS = ("char", "gpt2")
GPT2_VOCAB_SIZE = 50257  # 50,000 merges + 256 bytes + <|endoftext|>
GPT2_EOT = 50256
# Bump when the on-disk layout or the encoding recipe changes: old cache folders are then ignored.
FORMAT_VERSION = 2  # 2: meta.json holds each split's sha256, checked on every load
DTYPE = np.uint16  # as nanoGPT; both vocabularies fit (65 and 50,257 < 65,536)


class Tokenizer(Protocol):
    name: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def meta(self) -> dict: ...


class CharTokenizer:
    """Character-level tokeniser: token ``i`` is the ``i``-th of the sorted distinct characters."""

    name = "char"

    def __init__(self, chars: list[str]):
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise DataError("a character vocabulary must list distinct single characters")
        self.itos = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.itos)}
        self.vocab_size = len(self.itos)

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise DataError(
                f"character {e.args[0]!r} is not in the {self.vocab_size}-symbol vocabulary"
            ) from None

    def decode(self, ids) -> str:
        return "".join(self.itos[int(i)] for i in ids)

    def meta(self) -> dict:
        return {"tokenizer": self.name, "vocab_size": self.vocab_size, "itos": self.itos}


@functools.lru_cache(maxsize=1)
def gpt2_encoding():
    """The ``tiktoken`` GPT-2 encoding, built from the registered (checksum-verified) files.

    Same recipe as ``tiktoken_ext.openai_public.gpt2`` but with local files instead of URLs.
    """
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    from score_exp.data.registry import REGISTRY, fetch

    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(fetch("gpt2_vocab_bpe")),
        encoder_json_file=str(fetch("gpt2_encoder_json")),
        vocab_bpe_hash=REGISTRY["gpt2_vocab_bpe"].sha256,
        encoder_json_hash=REGISTRY["gpt2_encoder_json"].sha256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=GPT2_VOCAB_SIZE,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": GPT2_EOT},
    )


class GPT2Tokenizer:
    """GPT-2 BPE (``tiktoken``); ``encode`` ignores special tokens, as nanoGPT's prepare.py."""

    name = "gpt2"
    vocab_size = GPT2_VOCAB_SIZE

    def __init__(self):
        self.enc = gpt2_encoding()

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids])

    def meta(self) -> dict:
        return {"tokenizer": self.name, "vocab_size": self.vocab_size, "eot": GPT2_EOT}


def build_tokenizer(name: str, text: str | None = None) -> Tokenizer:
    """``char`` (needs the ``text`` its vocabulary comes from) or ``gpt2``."""
    if name == "char":
        if text is None:
            raise ValueError("the char tokenizer is built from a text")
        return CharTokenizer.from_text(text)
    if name == "gpt2":
        return GPT2Tokenizer()
    raise DataError(f"unknown tokenizer {name!r}; valid tokenizers: {', '.join(TOKENIZERS)}")


def tokenizer_from_meta(meta: dict) -> Tokenizer:
    """Rebuild the tokeniser saved by :meth:`Tokenizer.meta` (e.g. in ``meta.json``)."""
    name = meta.get("tokenizer")
    if name == "char":
        return CharTokenizer(meta["itos"])
    if name == "gpt2":
        return GPT2Tokenizer()
    raise DataError(f"unknown tokenizer {name!r} in vocabulary metadata")


# ----------------------------------------------------------------------------- memmaps


@dataclass(frozen=True)
class TokenFiles:
    """A prepared corpus: ``train.bin`` / ``val.bin`` (``uint16``) and ``meta.json`` in ``root``."""

    root: Path
    meta: dict

    def path(self, split: str) -> Path:
        if split not in ("train", "val"):
            raise ValueError(f"unknown split {split!r}; valid: train, val")
        return self.root / f"{split}.bin"

    def load(self, split: str) -> np.memmap:
        """The split's tokens as a read-only memmap (nothing is read into memory)."""
        return np.memmap(self.path(split), dtype=DTYPE, mode="r")

    def tokenizer(self) -> Tokenizer:
        return tokenizer_from_meta(self.meta)


def _as_tokens(ids: list[int]) -> np.ndarray:
    return np.asarray(ids, dtype=DTYPE)


def _cache_key(text_sha256: str, tokenizer: str, train_fraction: float) -> str:
    parts = [f"v{FORMAT_VERSION}", text_sha256, tokenizer, repr(float(train_fraction))]
    if tokenizer == "gpt2":  # the encoding is defined by its two files: key on their hashes
        from score_exp.data.registry import REGISTRY

        parts += [REGISTRY["gpt2_vocab_bpe"].sha256, REGISTRY["gpt2_encoder_json"].sha256]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _complete(root: Path) -> dict | None:
    """The metadata of a finished, intact preparation in ``root``, or None.

    A folder that exists but fails the check (a truncated or altered ``.bin``, an unreadable
    ``meta.json``) is reported with a warning naming the file; the caller prepares it again.
    """
    from score_exp.data.registry import sha256sum

    if not root.exists():
        return None
    where = root / "meta.json"
    try:
        meta = json.loads(where.read_text())
        for split in ("train", "val"):
            where = root / f"{split}.bin"
            if where.stat().st_size != meta[f"n_{split}"] * DTYPE().itemsize:
                raise ValueError(f"{where.stat().st_size} bytes for {meta[f'n_{split}']} tokens")
            if sha256sum(where) != meta[f"sha256_{split}"]:
                raise ValueError("its sha256 differs from meta.json's")
        return meta
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("token cache %s is unreadable (%s); preparing it again", where, e)
        return None


def prepare_tokens(
    text_path: str | Path,
    tokenizer: str = "char",
    cache: str | Path | None = None,
    train_fraction: float = 0.9,
) -> TokenFiles:
    """Encode a text into train/val token memmaps once; later calls return the cached files.

    The first ``train_fraction`` of the characters is ``train`` and the rest ``val`` (nanoGPT:
    0.9). Files live in ``cache/tokens/<tokenizer>-<key>/``, where ``key`` hashes the text, the
    tokeniser (and its files) and the split. They are written into a temporary folder that is
    renamed into place, so a crashed or concurrent preparation never leaves half-written files;
    a cached split whose size or sha256 (kept in ``meta.json``) no longer matches is prepared
    again, with a warning naming the file.

    Raises:
        DataError: the text is missing, unreadable or too short to hold both splits, or the
            tokeniser is unknown.
    """
    from score_exp.data.registry import MAX_DATA_BYTES, cache_dir, sha256sum

    if tokenizer not in TOKENIZERS:
        raise DataError(
            f"unknown tokenizer {tokenizer!r}; valid tokenizers: {', '.join(TOKENIZERS)}"
        )
    if not 0 < train_fraction < 1:
        raise DataError(f"train_fraction must be in (0, 1), got {train_fraction}")
    text_path = Path(text_path).expanduser()
    if not os.path.lexists(text_path):
        raise DataError(f"text file not found: {text_path}")
    text_sha = sha256sum(text_path)  # a regular file only: a FIFO is refused in one line
    root = Path(cache) if cache is not None else cache_dir() / "tokens"
    root = root / f"{tokenizer}-{_cache_key(text_sha, tokenizer, train_fraction)}"
    if (meta := _complete(root)) is not None:
        return TokenFiles(root, meta)

    try:
        from score_exp.runs.files import read_text

        text = read_text(text_path, MAX_DATA_BYTES)  # the file sha256sum read, as a regular file
    except (UnicodeDecodeError, ConfigError) as e:  # read_text: "not UTF-8 text", one line
        raise DataError(f"{text_path}: not a UTF-8 text file ({e})") from None
    n = len(text)
    split_at = int(n * train_fraction)
    if split_at < 2 or n - split_at < 2:
        raise DataError(f"{text_path}: {n} characters are too few for a train/val split")
    tok = build_tokenizer(tokenizer, text)
    log.info(
        "tokenizing %s (%s characters) with %s (cached once)", text_path.name, f"{n:,}", tokenizer
    )
    ids = {"train": tok.encode(text[:split_at]), "val": tok.encode(text[split_at:])}
    meta = {
        **tok.meta(),
        "source": str(text_path),
        "source_sha256": text_sha,
        "n_chars": n,
        "train_fraction": train_fraction,
        "n_train": len(ids["train"]),
        "n_val": len(ids["val"]),
        **{
            f"sha256_{k}": hashlib.sha256(_as_tokens(v).tobytes()).hexdigest()
            for k, v in ids.items()
        },
        "dtype": np.dtype(DTYPE).name,
        "format_version": FORMAT_VERSION,
    }

    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(mkdtemp_shared(root.parent, prefix=f".{root.name}.", suffix=".tmp"))
    except OSError as e:  # a read-only cache folder: one line (the memmaps need their files)
        from score_exp.data.registry import cache_not_writable

        raise cache_not_writable(root, e) from None
    try:
        for split, tokens in ids.items():
            _as_tokens(tokens).tofile(tmp / f"{split}.bin")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if root.exists():  # stale or incomplete (checked above): replace it
            shutil.rmtree(root, ignore_errors=True)
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished first; use its (identical) files
            if _complete(root) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("tokens: %s train, %s val -> %s", f"{meta['n_train']:,}", f"{meta['n_val']:,}", root)
    return TokenFiles(root, meta)
