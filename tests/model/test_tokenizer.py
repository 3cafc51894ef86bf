"""The o200k vocabulary resolves and verifies with no network; bad copies are refused or rebuilt."""

import hashlib
import urllib.request

import pytest

from ossie import tokenizer
from ossie.tokenizer import VOCAB_NAME, VOCAB_SHA256, VocabularyError, resolve_vocab, vocab_from_quicktok


@pytest.fixture()
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("OSSIE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("OSSIE_VOCAB_FILE", raising=False)
    monkeypatch.delenv("TIKTOKEN_ENCODINGS_BASE", raising=False)
    return tmp_path / "cache"


def test_quicktok_rebuild_has_the_official_hash():
    data = vocab_from_quicktok()
    assert hashlib.sha256(data).hexdigest() == VOCAB_SHA256
    assert data.count(b"\n") == 199998


def test_offline_resolution_builds_the_cache(fresh):
    folder = resolve_vocab()
    assert folder == fresh and hashlib.sha256((folder / VOCAB_NAME).read_bytes()).hexdigest() == VOCAB_SHA256


def test_failed_download_falls_back(fresh, monkeypatch):
    monkeypatch.setenv("OSSIE_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    calls = []

    def no_network(*a, **k):
        calls.append(a)
        raise OSError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    assert resolve_vocab() == fresh and calls


def test_download_with_wrong_hash_is_refused(fresh, monkeypatch):
    monkeypatch.setenv("OSSIE_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

    class Tampered:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def read(self):
            return b"dGFtcGVyZWQ= 0\n"

    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: Tampered())
    monkeypatch.setattr(tokenizer, "vocab_from_quicktok", lambda: (_ for _ in ()).throw(VocabularyError("none")))
    with pytest.raises(VocabularyError, match="SHA-256"):
        resolve_vocab()


def test_corrupted_cache_is_detected_and_rebuilt(fresh, caplog):
    resolve_vocab()
    path = fresh / VOCAB_NAME
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    assert resolve_vocab() == fresh
    assert hashlib.sha256(path.read_bytes()).hexdigest() == VOCAB_SHA256
    assert "not the official" in caplog.text


def test_explicit_file_is_verified(fresh, monkeypatch, tmp_path):
    bad = tmp_path / "vocab.txt"
    bad.write_bytes(b"dGFtcGVyZWQ= 0\n")
    monkeypatch.setenv("OSSIE_VOCAB_FILE", str(bad))
    with pytest.raises(VocabularyError, match="refusing"):
        resolve_vocab()
    good = tmp_path / "my-vocab.tiktoken"
    good.write_bytes(vocab_from_quicktok())
    monkeypatch.setenv("OSSIE_VOCAB_FILE", str(good))
    assert (resolve_vocab() / VOCAB_NAME).read_bytes() == good.read_bytes()
    monkeypatch.setenv("OSSIE_VOCAB_FILE", str(tmp_path / "missing"))
    with pytest.raises(VocabularyError, match="no such file"):
        resolve_vocab()
