"""The tokenizer a model ships with: tokenizer.json (the `tokenizers` library) plus what
tokenizer_config.json and the chat template say (eos, pad and bos tokens, how conversations render).

- Tokenizer.from_dir reads a model directory's files, each bounded in size before it is read and
  refused unless it is a regular file (fileio.read_bounded); save() writes them back so that
  transformers loads them too.
- pad_rows lays token id lists out as right-padded (rows, longest) tensors with their attention mask.
- Light at import: jinja2 (support.chat) and tokenizers load when a tokenizer is built, so that
  `from rm import RewardModel` imports neither.
"""
import json
import os
from pathlib import Path

import torch

from support.errors import UserError
from support.fileio import is_regular_file, read_bounded

MAX_TOKENIZER_BYTES = 256 << 20  # tokenizer.json: 11 MB for Qwen3's 151k tokens, a few times that for any other


class Tokenizer:
    """A thin wrapper over tokenizers.Tokenizer that knows its eos, pad and bos ids and the chat template."""

    def __init__(self, tok, eos_token: str, pad_token: str, config: dict | None = None,
                 chat_template: str | None = None):
        self.tok = tok
        self.eos_token, self.pad_token = eos_token, pad_token
        self.eos_id, self.pad_id = tok.token_to_id(eos_token), tok.token_to_id(pad_token)
        if self.eos_id is None or self.pad_id is None:
            raise UserError(f"tokenizer: eos {eos_token!r} or pad {pad_token!r} is not in the vocabulary; "
                            f"fix eos_token/pad_token in tokenizer_config.json")
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        # no token covers more characters than its vocabulary string has (bytes, for byte-level BPE)
        self.max_token_chars = max(map(len, tok.get_vocab(with_added_tokens=True)), default=1)
        self.config = dict(config or {})  # the rest of tokenizer_config.json, written back by save()
        from support import chat  # here: jinja2 loads when a tokenizer is built, not at import
        bos = chat.special_token_variables(self.config).get("bos_token")
        self.bos_id = tok.token_to_id(bos) if bos else None  # Qwen3 uses none
        self.chat_template = chat_template  # renders conversations (support/chat.py); saved as chat_template.jinja

    @classmethod
    def from_dir(cls, path: str) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer
        from support import chat
        file = Path(path) / "tokenizer.json"
        if not file.exists():
            raise UserError(f"{path}: no tokenizer.json; point at a model directory (a Hub download "
                            f"or one saved by train.py)")
        try:
            tok = HFTokenizer.from_str(read_bounded(file, MAX_TOKENIZER_BYTES).decode("utf-8"))
        except (ValueError, OSError) as e:  # read_bounded: too big, not a regular file; UTF-8 errors
            raise UserError(f"{file}: can't read it ({e}); re-download it") from None
        except Exception as e:  # the Rust side raises plain Exception on bad JSON
            raise UserError(f"{file}: not a valid tokenizer.json ({e}); re-download it") from None
        config = chat.read_tokenizer_config(path)  # bounded like every JSON file
        named = chat.special_token_variables(config)

        def token(key, defaults):
            return named.get(key) or next((t for t in defaults if tok.token_to_id(t) is not None), defaults[0])
        # Qwen3 defaults: post-trained models end turns with <|im_end|>; <|endoftext|> pads
        eos = token("eos_token", ["<|im_end|>", "<|endoftext|>"])
        pad = token("pad_token", ["<|endoftext|>", eos])
        return cls(tok, eos, pad, config, chat.load_chat_template(path, tokenizer_config=config))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list:
        """tokenizers Encodings (.ids, and .offsets: each token's characters), encoded in parallel."""
        return self.tok.encode_batch(texts, add_special_tokens=False)

    def eos_suffix(self, ids: list[int]) -> list[int]:
        """[eos_id] to end a text's ids with, or [] when they already end with it (no doubled eos) or when
        eos == pad: transformers, TRL and vLLM pool the last token that is NOT pad, so there an appended
        eos would be skipped, and our last token would no longer be theirs."""
        return [] if self.eos_id == self.pad_id or (ids and ids[-1] == self.eos_id) else [self.eos_id]

    def chat_format(self, choice: str = "auto") -> "chat.ChatFormat":
        """--chat_template auto|none|PATH -> how conversational rows are rendered. A PATH's template
        replaces this tokenizer's, so that it is saved with the model and used again to score."""
        from support import chat
        variables = {**chat.special_token_variables(self.config), "eos_token": self.eos_token,
                     "pad_token": self.pad_token}
        if choice == "none":
            return chat.ChatFormat(None, variables, "--chat_template is none; use --chat_template auto or PATH")
        if choice != "auto":
            self.chat_template = chat.load_chat_template(None, override=choice)
        return chat.ChatFormat(self.chat_template, variables, "the model's tokenizer has no chat template; "
                               "pass --chat_template PATH (a .jinja file, e.g. the instruct model's)")

    def char_cap(self, max_length: int) -> int:
        """The most characters a text can have and still fit in max_length tokens. A token covers at most
        max_token_chars characters (its vocabulary string's length), so this bound never drops a text that
        would fit; it fails only for tokenizers that map a whole unknown word to one token (WordLevel's unk)."""
        return max(max_length, 1) * self.max_token_chars

    def sequence(self, value, max_length: int | None = None) -> list[int]:
        """The ids the model reads for a whole text (+ eos_suffix) or a conversation (a list of messages,
        rendered with the chat template, nothing appended), as training feeds them. Longer than
        max_length keeps the END (the response), as training does: only the text's last char_cap
        characters are tokenised (a 5 MB text cost 450 MB), more than max_length tokens can cover."""
        text = value if isinstance(value, str) else self.chat_format().render(value)
        ids = self.encode(text[-self.char_cap(max_length):] if max_length else text)
        if isinstance(value, str):
            ids = ids + self.eos_suffix(ids)
        return ids[-max_length:] if max_length else ids

    def save(self, path: str):
        os.makedirs(path, exist_ok=True)
        self.tok.save(os.path.join(path, "tokenizer.json"))
        config = {**self.config, "eos_token": self.eos_token, "pad_token": self.pad_token}
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")  # loadable by transformers too
        if self.chat_template is not None:  # where transformers saves it (and looks first)
            config.pop("chat_template", None)
            with open(os.path.join(path, "chat_template.jinja"), "w", encoding="utf-8") as f:
                f.write(self.chat_template)
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)


def require_file(model_dir: Path):
    """A model directory that will score text holds its tokenizer.json (a regular file: a FIFO is named as
    one); checked before the weights load (eval.py, its --benchmark, tools/serve.py)."""
    if not is_regular_file(Path(model_dir) / "tokenizer.json"):
        raise UserError(f"{model_dir} holds no tokenizer.json; copy the tokenizer files of the base model there")


def pad_rows(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> input_ids, attention_mask (len(seqs), longest), right-padded with pad_id."""
    T = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for row, ids in enumerate(seqs):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, :len(ids)] = 1
    return input_ids, attention_mask
