"""
The tokenizers LLaMA checkpoints come with, told apart by their content: SentencePiece (LLaMA-1 and 2), and Llama 3's
byte-level BPE as Meta ships it (tokenizer.model, a "base64(bytes) rank" line per token) or as Hugging Face does
(tokenizer.json). Both have one interface: encode(text, bos, eos), decode(ids), bos_id, eos_id, n_words, the stop_ids
that end a generation, and chat_prompt(user), the chat format's prompt (Llama 3's; a SentencePiece one refuses it);
Llama 3's also has `special`, its special tokens by name. It runs on tiktoken, imported only when one is read (pip
install tiktoken).
"""
import base64
import binascii
import re
from pathlib import Path

from cli import InputError, parse_json, read_text


class SentencePieceTokenizer:
    """SentencePiece, as LLaMA uses it: BOS and EOS are ids of the model, not pieces in the text."""

    def __init__(self, path, stop_ids=None):
        import sentencepiece
        self.path = Path(path)
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.n_words, self.bos_id, self.eos_id = self.sp.vocab_size(), self.sp.bos_id(), self.sp.eos_id()
        self.stop_ids = set(stop_ids or {self.eos_id})  # the ids that end a generation

    def encode(self, text: str, bos: bool, eos: bool) -> list:
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids) -> str:
        return self.sp.decode(list(ids))

    def chat_prompt(self, user: str) -> list:
        raise InputError(f"{self.path}: --template=llama3 needs a Llama 3 tokenizer, and this one is SentencePiece")


class BPETokenizer:
    """Llama 3's byte-level BPE, on tiktoken (as Meta's reference). ranks: {bytes: id} (Llama 3: 128,000); special:
    {"<|begin_of_text|>": id, ...}, the ids after the ranks. Text is split by PATTERN, then each piece is merged
    from bytes, lowest rank first; a piece that is itself in the vocabulary is one token. Special-token text
    inside the data ("<|eot_id|>" in an instruction) is encoded as plain text, never as a control id."""
    PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")

    def __init__(self, ranks: dict, special: dict, path, stop_ids=None):
        import tiktoken  # optional: only Llama 3 needs it
        self.model = tiktoken.Encoding("llama3", pat_str=self.PATTERN, mergeable_ranks=ranks, special_tokens=special)
        self.path, self.special, self.n_words = Path(path), special, self.model.n_vocab  # Llama 3: 128,256
        self.bos_id, self.eos_id = special["<|begin_of_text|>"], special["<|end_of_text|>"]
        # Base models end a text with <|end_of_text|>; instruct ones end their turn with <|eot_id|> (or <|eom_id|>)
        ends = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")
        self.stop_ids = set(stop_ids or {special[t] for t in ends if t in special})

    def encode(self, text: str, bos: bool, eos: bool) -> list:
        return [self.bos_id] * bos + self.model.encode(text, disallowed_special=()) + [self.eos_id] * eos

    def decode(self, ids) -> str:
        return self.model.decode(list(ids))

    def chat_prompt(self, user: str) -> list:
        """The user's turn and the assistant's header in Llama 3's chat format, its markers as control ids:
        <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n{user}<|eot_id|><|start_header_id|>assistant
        <|end_header_id|>\\n\\n; the response follows, ended by <|eot_id|>."""
        def header(role):
            return [self.special["<|start_header_id|>"], *self.encode(role, False, False),
                    self.special["<|end_header_id|>"], *self.encode("\n\n", False, False)]
        return [self.bos_id, *header("user"), *self.encode(user, False, False), self.special["<|eot_id|>"],
                *header("assistant")]


# Llama 3's 256 special tokens follow the ranks; those with a role, by their offset from the first (the others are
# <|reserved_special_token_0|>, _1, ..., numbered in id order)
LLAMA3_SPECIAL = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 4: "<|finetune_right_pad_id|>", 5: "<|step_id|>",
                  6: "<|start_header_id|>", 7: "<|end_header_id|>", 8: "<|eom_id|>", 9: "<|eot_id|>",
                  10: "<|python_tag|>"}


def llama3_special(first_id) -> dict:
    reserved = (i for i in range(256) if i not in LLAMA3_SPECIAL)
    names = {**LLAMA3_SPECIAL, **{i: f"<|reserved_special_token_{n}|>" for n, i in enumerate(reserved)}}
    return {names[i]: first_id + i for i in range(256)}


def read_rank_file(path, text) -> tuple:
    """Meta's tokenizer.model for Llama 3: (ranks {bytes: rank}, special tokens {text: id}). Read here rather than
    with tiktoken's load_tiktoken_bpe, which some versions route through blobfile and a cache folder."""
    ranks = {}
    for n, line in enumerate(text.splitlines(), 1):
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise InputError(f"{path}: line {n}: expected 'base64-bytes rank', found {line[:60]!r}") from None
    return ranks, llama3_special(len(ranks))


def read_tokenizer_json(path, text) -> tuple:
    """Hugging Face's tokenizer.json of a byte-level BPE: (ranks {bytes: id}, special tokens {text: id}). A token's
    rank is its id; its bytes are spelled in GPT-2's characters: the printable bytes stand for themselves, the
    others (space, control bytes, ...) for the characters from U+0100 on, in byte order."""
    data = parse_json(text, path)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise InputError(f"{path}: not a BPE tokenizer (no model of type 'BPE' with a 'vocab')")
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    to_byte = {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}
    try:
        ranks = {bytes(to_byte[c] for c in token): int(i) for token, i in model["vocab"].items()}
        ids = set(ranks.values())  # a set: 256 added tokens against 128,000 ids, one lookup each
        special = {t["content"]: int(t["id"]) for t in data.get("added_tokens", []) if t["id"] not in ids}
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{path}: not a byte-level BPE tokenizer ({str(e)[:60]!r} is not in GPT-2's byte "
                         f"characters, or an added token is malformed)") from None
    return ranks, special


def read_tokenizer(path, stop_ids=None):
    """The tokenizer in the file at `path`, whichever of the three kinds it is. stop_ids: where generation ends,
    when the checkpoint says (generation_config.json)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such tokenizer file")
    with open(path, "rb") as f:
        head = f.read(4096)
    if not (head.lstrip()[:1] == b"{" or re.match(rb"[A-Za-z0-9+/]+=* \d+\r?\n", head)):  # neither JSON nor rank lines
        try:
            return SentencePieceTokenizer(path, stop_ids)
        except (RuntimeError, OSError) as e:
            raise InputError(f"{path}: neither a SentencePiece model nor a Llama 3 tokenizer ({e})") from None
    text = read_text(path)
    ranks, special = read_tokenizer_json(path, text) if head.lstrip()[:1] == b"{" else read_rank_file(path, text)
    missing = [t for t in ("<|begin_of_text|>", "<|end_of_text|>") if t not in special]
    lost = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise InputError(f"{path}: not a Llama 3 tokenizer (no {missing[0]})")
    if lost:
        raise InputError(f"{path}: not a byte-level BPE: byte {lost[0]:#04x} has no token")
    if len(set(ranks.values())) != len(ranks) or len(set(special.values())) != len(special):
        raise InputError(f"{path}: two tokens share an id")
    try:
        return BPETokenizer(ranks, special, path, stop_ids)
    except ImportError:
        raise InputError(f"{path}: a Llama 3 tokenizer, which needs tiktoken: pip install tiktoken") from None
