"""Byte-level BPE (Rust `tokenizers`, never `transformers`): training, special tokens, the chat
template, Hugging Face tokenizer files (what `transformers.AutoTokenizer` loads: our one format).

- The 256-byte initial alphabet: every UTF-8 string encodes and decodes back unchanged.
- Every digit its own piece, then the GPT-2 split, no normalizer: every number gets one regular
  spelling (left to BPE, frequent numbers merge), which arithmetic needs. llama.cpp tokenizes exactly
  so as `starcoder` (older tokenizers, plain GPT-2 split, as `gpt-2`): no tokenizer of its own there.
- Llama 4's special tokens and chat layout at ids 0..5, which do not move with the vocabulary size.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from behemoth.durable import write_atomic
from behemoth.errors import ConfigError
from behemoth.jsonio import read_jsonl

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
HEADER_START, HEADER_END, EOT = "<|header_start|>", "<|header_end|>", "<|eot|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, HEADER_START, HEADER_END, EOT)  # ids 0..5, in this order
CHAT_ROLES = ("system", "user", "assistant")
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + 1  # every byte, the specials and at least one merge
DEFAULT_MODEL_MAX_LENGTH = 131072  # ModelConfig's default context; pass the model's own when known
TEXT_SUFFIXES = (".txt", ".jsonl")
TXT_PIECE_CHARS = 1 << 20  # .txt files reach the trainer in pieces of about this many characters

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
SPECIAL_TOKENS_MAP = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
                      "additional_special_tokens": [HEADER_START, HEADER_END, EOT]}

# The Jinja twin of `Tokenizer.apply_chat_template`. Only expressions emit text, so Jinja's
# whitespace trimming cannot change the output. Unlike Llama 4, no "\n\n" after <|header_end|>:
# byte-level BPE would encode those newlines differently when content follows (training) than at
# the end of a generation prompt, so the model would be prompted with a token boundary it never
# saw. With a special token right before the content, every way of encoding a conversation (whole
# string, per message, the server's) gives the same ids.
CHAT_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('chat role must be system, user or assistant, not ' ~ message['role']) }}"
    "{% endif %}"
    "{{ '<|header_start|>' + message['role'] + '<|header_end|>' + message['content'] + '<|eot|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|header_start|>assistant<|header_end|>' }}{% endif %}"
)


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer`: id lists, special-token ids, the chat layout, a hash."""

    def __init__(self, backend: tokenizers.Tokenizer, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH):
        self.backend = backend  # the `tokenizers.Tokenizer`, for what this wrapper does not cover
        ids = _special_token_ids(backend)
        self.bos_id, self.eos_id, self.pad_id = ids[BOS], ids[EOS], ids[PAD]
        self.eot_id = ids[EOT]  # ends a chat turn: chat generation stops on it as well as on EOS
        self.model_max_length = model_max_length
        self.training_chars: int | None = None  # characters seen by `train_tokenizer`; None if loaded

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no BOS/EOS added: documents are framed by the data pipeline."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Same as `encode` per text, but on the Rust thread pool: the fast path for data prep."""
        return [e.ids for e in self.backend.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, special tokens kept (decode(encode(s)) == s). Ids outside the vocabulary
        are skipped (an embedding may be larger); a cut multi-byte character decodes to U+FFFD."""
        return self.backend.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included (the model's embedding needs at least this)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of tokenizer.json in canonical form (sorted keys, no whitespace), so the hash
        names the tokenizer, not the file's formatting: manifests tie data shards to it."""
        canonical = json.dumps(json.loads(self.backend.to_str()), sort_keys=True,
                               separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        """The chat layout as text, as `CHAT_TEMPLATE` renders it (`encode` gives the special tokens' ids)."""
        parts = [BOS]
        for i, message in enumerate(messages):
            role, content = _checked_message(i, message)
            parts.append(f"{HEADER_START}{role}{HEADER_END}{content}{EOT}")
        if add_generation_prompt:
            parts.append(f"{HEADER_START}assistant{HEADER_END}")
        return "".join(parts)

    def save_pretrained(self, directory: str | Path, model_max_length: int | None = None) -> Path:
        """Write the files `transformers.AutoTokenizer` reads into `directory`, each atomically."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
                  "model_max_length": model_max_length or self.model_max_length,
                  "add_bos_token": False, "add_eos_token": False,
                  "clean_up_tokenization_spaces": False,  # decoding must give back the exact text
                  "chat_template": CHAT_TEMPLATE}
        write_atomic(out / TOKENIZER_FILE, self.backend.to_str(pretty=True))
        write_atomic(out / CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        write_atomic(out / SPECIAL_TOKENS_MAP_FILE, json.dumps(SPECIAL_TOKENS_MAP, indent=2) + "\n")
        return out

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Read a directory written by `save_pretrained` (or any with our special tokens)."""
        folder = Path(directory)
        if not folder.is_dir():
            raise ConfigError(f"{folder}: no such tokenizer directory")
        backend = _read_backend(folder / TOKENIZER_FILE)
        max_length = _read_model_max_length(folder / CONFIG_FILE)
        try:
            return cls(backend, max_length)
        except ConfigError as err:
            raise ConfigError(f"{folder / TOKENIZER_FILE}: {err}") from None

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, sha256={self.sha256[:12]}...)"


# -- training -------------------------------------------------------------------------------------

def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train byte-level BPE on `texts`; `vocab_size` counts the six special tokens. A small corpus
    can run out of merges first: the result then has fewer ids (safe for the larger embedding)."""
    _check_vocab_size(vocab_size)
    chars = 0

    def counted() -> Iterator[str]:  # training reports how much text it saw
        nonlocal chars
        for text in texts:
            chars += len(text)
            yield text

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(counted(), trainer)
    if chars == 0:
        raise ConfigError("no training text: the data given is empty")
    tokenizer = Tokenizer(backend)
    tokenizer.training_chars = chars
    return tokenizer


def train_tokenizer_from_files(paths: list[Path], vocab_size: int) -> Tokenizer:
    """Train on .txt and .jsonl files (their "text" fields) and folders of them; every path is checked
    first, so a typo fails in a second, not after an hour."""
    _check_vocab_size(vocab_size)
    return train_tokenizer(read_texts(find_text_files(paths)), vocab_size)


def find_text_files(paths: Iterable[str | Path]) -> list[Path]:
    """The files behind `paths`: files as given, folders searched recursively in sorted order."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
            if not found:
                raise ConfigError(f"{path}: folder holds no .txt or .jsonl files")
            files.extend(found)
        elif not path.exists():
            raise ConfigError(f"{path}: no such file or folder")
        elif path.suffix not in TEXT_SUFFIXES:
            raise ConfigError(f"{path}: expected a .txt or .jsonl file or a folder of them")
        else:
            files.append(path)
    if not files:
        raise ConfigError("no training data given")
    return files


def read_texts(files: Iterable[Path]) -> Iterator[str]:
    """Text of .txt files (in large pieces) and "text" fields of .jsonl files, streamed."""
    for file in files:
        try:
            yield from _jsonl_texts(file) if file.suffix == ".jsonl" else _txt_pieces(file)
        except UnicodeDecodeError:
            raise ConfigError(f"{file}: not valid UTF-8 text") from None


def _txt_pieces(file: Path) -> Iterator[str]:
    """A .txt file in pieces of about TXT_PIECE_CHARS, cut where the GPT-2 split cuts anyway: lines
    would lose whitespace runs that span them (a paragraph break), a whole file may not fit memory."""
    buffer = ""
    with file.open(encoding="utf-8", newline="") as f:
        while block := f.read(TXT_PIECE_CHARS):
            searched_to = len(buffer)  # the remainder of the previous block holds no cut
            buffer += block
            cut = _last_safe_cut(buffer, max(searched_to - 1, 0))
            if cut > 0:
                yield buffer[:cut]
                buffer = buffer[cut:]
    if buffer:
        yield buffer


_SAFE_CUT = re.compile(r"\S(?=[\r\n])")


def _last_safe_cut(text: str, start: int) -> int:
    """Index of the last line break after a non-space character, from `start` on (0 if none). No
    pre-token spans such a point (the non-space character ends its token, and the regex has no
    look-behind), so both halves pre-tokenize exactly as the whole text would."""
    last = None
    for last in _SAFE_CUT.finditer(text, start):
        pass
    return last.end() if last else 0


def _jsonl_texts(file: Path) -> Iterator[str]:
    for number, record in read_jsonl(file, style="colon"):
        text = record.get("text")
        if not isinstance(text, str):
            raise ConfigError(f'{file}:{number}: expected an object with a "text" string')
        yield text


def _check_vocab_size(vocab_size: int) -> None:
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + "
                          f"{len(SPECIAL_TOKENS)} special tokens + 1 merge), got {vocab_size!r}")


# -- helpers --------------------------------------------------------------------------------------

def _special_token_ids(backend: tokenizers.Tokenizer) -> dict[str, int]:
    ids = {token: backend.token_to_id(token) for token in SPECIAL_TOKENS}
    missing = [token for token, i in ids.items() if i is None]
    if missing:
        raise ConfigError(f"tokenizer lacks special token(s) {', '.join(missing)}")
    return ids


def _checked_message(index: int, message: Any) -> tuple[str, str]:
    if not isinstance(message, Mapping):
        raise ConfigError(f"chat message {index} must be a dict with role and content")
    role, content = message.get("role"), message.get("content")
    if role not in CHAT_ROLES:
        raise ConfigError(f"chat message {index}: role must be system, user or assistant, not {role!r}")
    if not isinstance(content, str):
        raise ConfigError(f"chat message {index}: content must be a string, not {type(content).__name__}")
    return role, content


def _read_json(file: Path) -> Any:
    if not file.is_file():
        raise ConfigError(f"{file}: missing")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{file}: not valid UTF-8") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{file}: invalid JSON at line {err.lineno} column {err.colno} ({err.msg})") from None


def _read_model_max_length(file: Path) -> int:
    """tokenizer_config.json is optional (a bare tokenizer.json is a complete tokenizer)."""
    config = _read_json(file) if file.exists() else {}
    value = config.get("model_max_length", DEFAULT_MODEL_MAX_LENGTH) if isinstance(config, dict) else None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{file}: model_max_length must be a positive integer")
    return value


def _read_backend(file: Path) -> tokenizers.Tokenizer:
    text = json.dumps(_read_json(file))
    try:
        return tokenizers.Tokenizer.from_str(text)
    except Exception as err:  # the Rust library raises plain Exception with a multi-line message
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{file}: not a tokenizers file ({reason})") from None
