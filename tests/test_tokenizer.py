"""Tokenizer: lossless round trips, parity with transformers, fixed special ids, refusal of bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import pre_tokenizers

import behemoth
import behemoth.tokenizer
from behemoth.cli import main
from behemoth.config import preset
from behemoth.errors import ConfigError
from behemoth.model import init_weights
from behemoth.tokenizer import (CHAT_TEMPLATE, SPECIAL_TOKENS, Tokenizer, read_texts, train_tokenizer,
                                train_tokenizer_from_files)

VOCAB = 600
TINYSTORIES = Path(__file__).resolve().parents[1] / "../shared/data/tinystories/tinystories_sample.txt"

# Text that stresses byte-level BPE: multi-byte scripts, emoji with joiners and modifiers,
# combining marks, control characters, every kind of whitespace, and special-token lookalikes.
ODD_FRAGMENTS = [
    "😀", "👩‍👩‍👧", "👍🏽", "🇫🇷", "漢字", "東京タワー", "한국어", "مرحبا", "नमस्ते", "e\u0301", "Ω≈ç√",
    "\x00", "\x01", "\x7f", "\x1b[0m", "\r\n", "\r", "\t", "\x0b", "\x0c", "\u00a0", "\u2028", "\u3000",
    "\ufeff", "\u200b", "   ", "\n\n\n", " ", "'s", "'ll", "don't", "3.14159", "1,000,000", "#!@$%^&*()",
    "<|eot|>", "<|begin_of_text|>", "<|header_start|>", "<|pad", "|>", "<|", "\U0010ffff", "\ud7ff",
]
odd_text = st.lists(st.one_of(st.sampled_from(ODD_FRAGMENTS), st.text(max_size=8)), max_size=12).map("".join)


def english_like_corpus(seed: int = 0, sentences: int = 3000) -> list[str]:
    """Pseudo-English: made-up words from syllables, capitals, punctuation, numbers, paragraphs."""
    rng = random.Random(seed)
    syllables = ["the", "an", "ing", "ed", "er", "ly", "on", "re", "st", "ca", "mo", "ti", "ba", "lu", "qu",
                 "ph", "sh", "ou", "ai", "ck", "ea", "or", "in", "al", "ter", "pro", "con", "x", "z", "ee"]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(400)]
    words += ["the", "a", "and", "of", "to", "in", "is", "was", "he", "she", "it", "they", "said"]
    lines = []
    for _ in range(sentences):
        sentence = " ".join(rng.choices(words, k=rng.randint(3, 14)))
        if rng.random() < 0.2:
            sentence += f" {rng.randint(0, 99999)}"
        if rng.random() < 0.1:
            sentence = f'"{sentence}," {rng.choice(words)} said'
        lines.append(sentence[0].upper() + sentence[1:] + rng.choice([".", ".", "!", "?", ";"]) +
                     rng.choice([" ", " ", "\n", "\n\n"]))
    return lines


def varied_strings(corpus: list[str], count: int = 400, seed: int = 1) -> list[str]:
    """Corpus sentences, odd-fragment mixes and both combined: the parity test's inputs."""
    rng = random.Random(seed)
    out = ["", " ", "Hello world!", "  leading and trailing  ", "tab\tseparated\tvalues", "x" * 300]
    while len(out) < count:
        kind = rng.randrange(3)
        sentence = "".join(rng.choices(corpus, k=rng.randint(1, 3)))
        odd = "".join(rng.choices(ODD_FRAGMENTS, k=rng.randint(1, 8)))
        out.append(sentence if kind == 0 else odd if kind == 1 else sentence + odd + sentence[::-1])
    return out


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return english_like_corpus()


@pytest.fixture(scope="module")
def tok(corpus) -> Tokenizer:
    return train_tokenizer(corpus, VOCAB)


@pytest.fixture(scope="module")
def saved_dir(tok, tmp_path_factory) -> Path:
    return tok.save_pretrained(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def hf(saved_dir):
    return transformers.AutoTokenizer.from_pretrained(str(saved_dir))


# ------------------------------------------------------------------------------------------------
# Vocabulary and special tokens
# ------------------------------------------------------------------------------------------------

def test_special_tokens_have_fixed_ids(tok):
    assert [tok.backend.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(6))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eot_id) == (0, 1, 2, 5)
    assert tok.encode("<|header_start|>user<|header_end|>")[0] == 3


def test_vocab_size_as_requested_and_every_byte_has_a_token(tok):
    assert tok.vocab_size == VOCAB
    assert all(tok.backend.token_to_id(c) is not None for c in pre_tokenizers.ByteLevel.alphabet())
    assert tok.training_chars == sum(map(len, english_like_corpus()))


def test_small_corpus_yields_fewer_ids_not_an_error():
    assert 263 <= train_tokenizer(["tiny tiny text"], 5000).vocab_size < 5000


# ------------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_any_text(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=300, deadline=None)
@given(odd_text)
def test_round_trip_odd_text(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_round_trip_corpus_and_odd_fragments(tok, corpus):
    for text in varied_strings(corpus) + ODD_FRAGMENTS:
        assert tok.decode(tok.encode(text)) == text, repr(text)


def test_encode_batch_equals_encode(tok, corpus):
    texts = varied_strings(corpus, count=200)
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch([]) == []


def test_trained_merges_compress_text(tok, corpus):
    text = "".join(corpus[:200])
    assert len(tok.encode(text)) < len(text.encode()) / 2


# ------------------------------------------------------------------------------------------------
# Chat template
# ------------------------------------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 😀 漢字?\n\nTell me."}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": "  spaces  \n"}],
]


def test_chat_template_layout(tok):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert tok.apply_chat_template(messages) == (
        "<|begin_of_text|><|header_start|>system<|header_end|>S<|eot|>"
        "<|header_start|>user<|header_end|>U<|eot|>")
    assert tok.apply_chat_template(messages, add_generation_prompt=True).endswith(
        "U<|eot|><|header_start|>assistant<|header_end|>")
    ids = tok.encode(tok.apply_chat_template(messages))
    assert ids[:2] == [tok.bos_id, 3] and ids[-1] == tok.eot_id
    assert tok.apply_chat_template([]) == "<|begin_of_text|>"  # transformers refuses an empty chat


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_transformers_chat_template_equals_ours(tok, hf, messages, generation_prompt):
    theirs = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    assert theirs == tok.apply_chat_template(messages, add_generation_prompt=generation_prompt)


def test_transformers_refuses_unknown_role_too(hf):
    with pytest.raises(Exception, match="tool"):
        hf.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


# ------------------------------------------------------------------------------------------------
# transformers parity and files
# ------------------------------------------------------------------------------------------------

def test_transformers_encodes_identically(tok, hf, corpus):
    texts = varied_strings(corpus)
    assert len(texts) >= 300
    for text in texts:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text), repr(text)
    assert hf.decode(tok.encode(texts[-1])) == texts[-1]


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.text(), odd_text))
def test_transformers_encodes_identically_any_text(tok, hf, text):
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)


def test_transformers_special_tokens(hf):
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    assert hf.encode("abc") == hf.encode("abc", add_special_tokens=False)  # no BOS added behind our back
    assert len(hf) == VOCAB


def test_saved_files(saved_dir):
    assert {p.name for p in saved_dir.iterdir()} == {
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    config = json.loads((saved_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == SPECIAL_TOKENS[:3]
    assert config["chat_template"] == CHAT_TEMPLATE and config["model_max_length"] > 0
    pre = json.loads((saved_dir / "tokenizer.json").read_text())["pre_tokenizer"]
    digits, split = pre["pretokenizers"]
    assert digits == {"type": "Digits", "individual_digits": True}
    assert (split["type"], split["add_prefix_space"], split["use_regex"]) == ("ByteLevel", False, True)


def test_every_number_is_spelled_digit_by_digit():
    """BPE never merges digits, however often a number occurs: "41" is "4" "1" as "12" is "1" "2"."""
    tok = train_tokenizer(["What is 12 plus 12? It is 24. In 2026 and 1999, 41 came after 40. "] * 200, 400)
    digit_ids = [tok.encode(str(d)) for d in range(10)]
    assert all(len(ids) == 1 for ids in digit_ids)
    for number in ("12", "41", "2026", "1999", "100000"):
        assert tok.encode(number) == [digit_ids[int(d)][0] for d in number]
    assert tok.decode(tok.encode("in 2026, 41.5 ")) == "in 2026, 41.5 "


def test_load_round_trip_and_sha256(tok, saved_dir, corpus):
    loaded = Tokenizer.load(saved_dir)
    assert loaded.sha256 == tok.sha256 and len(tok.sha256) == 64
    assert loaded.vocab_size == tok.vocab_size and loaded.training_chars is None
    texts = varied_strings(corpus, count=50)
    assert loaded.encode_batch(texts) == tok.encode_batch(texts)
    again = loaded.save_pretrained(saved_dir.parent / "again", model_max_length=4096)
    assert Tokenizer.load(again).sha256 == tok.sha256 and Tokenizer.load(again).model_max_length == 4096


def test_sha256_names_the_tokenizer(tok, corpus):
    assert train_tokenizer(corpus, VOCAB).sha256 == tok.sha256  # training is deterministic
    assert train_tokenizer(corpus, VOCAB - 1).sha256 != tok.sha256
    assert train_tokenizer(english_like_corpus(seed=5), VOCAB).sha256 != tok.sha256


def test_saved_with_a_model_loads_in_transformers(tok, tmp_path):
    model = behemoth.Transformer(preset("tiny"))
    init_weights(model, seed=0)
    directory = behemoth.save(model, tmp_path / "model", tokenizer=tok)
    assert Tokenizer.load(directory).sha256 == tok.sha256
    hf = transformers.AutoTokenizer.from_pretrained(str(directory))
    assert hf.encode("Once upon a time", add_special_tokens=False) == tok.encode("Once upon a time")


# ------------------------------------------------------------------------------------------------
# Training from files
# ------------------------------------------------------------------------------------------------

def test_train_from_txt_jsonl_and_folders(tmp_path, corpus):
    folder = tmp_path / "data" / "nested"
    folder.mkdir(parents=True)
    (folder / "a.txt").write_text("".join(corpus[:1000]), encoding="utf-8")
    (folder / "ignored.md").write_text("not training data")
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(corpus[1000:2000])) + "\n\n")
    tok = train_tokenizer_from_files([tmp_path / "data", jsonl], 400)
    assert tok.vocab_size == 400
    assert tok.training_chars == sum(map(len, corpus[:2000]))
    # a .txt file is one text, a .jsonl file one text per line
    assert tok.sha256 == train_tokenizer(["".join(corpus[:1000])] + corpus[1000:2000], 400).sha256


def test_txt_pieces_pre_tokenize_like_the_whole_file(tmp_path, corpus, monkeypatch):
    """Large .txt files reach the trainer in pieces; the cuts must not change what it learns."""
    rng = random.Random(3)
    parts = corpus[:300] + ODD_FRAGMENTS * 3 + ["\r\n", "  \n", "\n\n\t", "word\r\n"] * 20
    rng.shuffle(parts)
    text = "".join(parts)
    (tmp_path / "a.txt").write_text(text, encoding="utf-8", newline="")
    monkeypatch.setattr(behemoth.tokenizer, "TXT_PIECE_CHARS", 97)
    pieces = list(read_texts([tmp_path / "a.txt"]))
    assert len(pieces) > 20 and "".join(pieces) == text
    split = train_tokenizer(corpus[:50], 300).backend.pre_tokenizer.pre_tokenize_str
    assert [t for piece in pieces for t, _ in split(piece)] == [t for t, _ in split(text)]


def test_train_from_tinystories_sample():
    if not TINYSTORIES.is_file():
        pytest.skip(f"{TINYSTORIES} not present (the shared test data lives beside the checkout)")
    tok = train_tokenizer_from_files([TINYSTORIES], 1000)
    assert tok.vocab_size == 1000
    text = "Once upon a time, there was a little girl named Lily."
    assert len(tok.encode(text)) < 20 and tok.decode(tok.encode(text)) == text


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("vocab_size", [0, 100, 262])
def test_vocab_size_too_small(tmp_path, vocab_size):
    with pytest.raises(ConfigError, match="vocab_size.*263"):
        train_tokenizer(["some text"], vocab_size)
    with pytest.raises(ConfigError, match="vocab_size"):
        train_tokenizer_from_files([tmp_path / "missing.txt"], vocab_size)  # checked before the files


def test_missing_or_unusable_paths(tmp_path):
    with pytest.raises(ConfigError, match="missing.txt: no such file"):
        train_tokenizer_from_files([tmp_path / "missing.txt"], 300)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="empty: folder holds no"):
        train_tokenizer_from_files([tmp_path / "empty"], 300)
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    with pytest.raises(ConfigError, match="data.parquet: expected a .txt or .jsonl"):
        train_tokenizer_from_files([tmp_path / "data.parquet"], 300)
    with pytest.raises(ConfigError, match="no training data"):
        train_tokenizer_from_files([], 300)


def test_bad_file_contents(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.txt: not valid UTF-8"):
        train_tokenizer_from_files([tmp_path / "latin1.txt"], 300)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(ConfigError, match="bad.jsonl:2: invalid JSON"):
        train_tokenizer_from_files([tmp_path / "bad.jsonl"], 300)
    (tmp_path / "notext.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ConfigError, match='notext.jsonl:1: .*"text"'):
        train_tokenizer_from_files([tmp_path / "notext.jsonl"], 300)
    (tmp_path / "blank.txt").write_text("")
    with pytest.raises(ConfigError, match="empty"):
        train_tokenizer_from_files([tmp_path / "blank.txt"], 300)


@pytest.mark.parametrize("message, pattern", [
    ({"role": "tool", "content": "x"}, "'tool'"),
    ({"content": "x"}, "None"),
    ({"role": "user", "content": ["parts"]}, "content must be a string"),
    ("just text", "must be a dict"),
])
def test_bad_chat_messages(tok, message, pattern):
    with pytest.raises(ConfigError, match=f"chat message 1.*{pattern}"):
        tok.apply_chat_template([{"role": "user", "content": "ok"}, message])


def test_load_refuses_bad_directories(tmp_path, saved_dir):
    with pytest.raises(ConfigError, match="nowhere: no such tokenizer directory"):
        Tokenizer.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="tokenizer.json: missing"):
        Tokenizer.load(tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text('{"version": "1.0", ')
    with pytest.raises(ConfigError, match=r"broken/tokenizer.json: invalid JSON at line 1"):
        Tokenizer.load(broken)
    (broken / "tokenizer.json").write_text('{"version": "1.0"}')
    with pytest.raises(ConfigError, match="tokenizer.json: not a tokenizers file"):
        Tokenizer.load(broken)
    (broken / "tokenizer.json").write_text((saved_dir / "tokenizer.json").read_text())
    (broken / "tokenizer_config.json").write_text("{nope")
    with pytest.raises(ConfigError, match="tokenizer_config.json: invalid JSON"):
        Tokenizer.load(broken)


def test_load_refuses_tokenizer_without_our_special_tokens(tmp_path):
    other = train_tokenizer(["some text"], 300).backend
    data = json.loads(other.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|eot|>"]
    del data["model"]["vocab"]["<|eot|>"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"tokenizer.json: .*<\|eot\|>"):
        Tokenizer.load(tmp_path)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

def test_cli_missing_data_path_is_one_line_exit_2(tmp_path, capsys):
    missing = tmp_path / "no-such-corpus.txt"
    code = main(["tokenizer", "train", "--data", str(missing), "--vocab-size", "300", "--out", str(tmp_path / "t")])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "no-such-corpus.txt" in err and err.startswith("behemoth: error:")
    assert not (tmp_path / "t").exists()


def test_cli_trains_and_writes(tmp_path, capsys, corpus):
    data = tmp_path / "corpus.txt"
    data.write_text("".join(corpus[:500]), encoding="utf-8")
    out_dir = tmp_path / "tok"
    assert main(["tokenizer", "train", "--data", str(data), "--vocab-size", "320", "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    loaded = Tokenizer.load(out_dir)
    assert loaded.vocab_size == 320
    assert "320" in out and f"{len(data.read_text(encoding='utf-8')):,} characters" in out and str(out_dir) in out
    assert loaded.sha256 in out
