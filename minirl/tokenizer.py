"""Tokenizer and chat template, read straight from a Hugging Face model directory.

RL on a chat model only works if the prompts are token for token the ones it was fine-tuned on, so this
module does what transformers does with the same files, without importing it: `tokenizer.json` runs in
the `tokenizers` library (the Rust code transformers wraps); the chat template (in `tokenizer_config.json`
or `chat_template.jinja`) renders in transformers' Jinja environment; the stop tokens are the tokenizer's
`eos_token` and generation_config.json's `eos_token_id` list (instruct models end a turn with their own).
"""

import functools
import json
import os
from dataclasses import dataclass
from datetime import datetime

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

CHAT_TEMPLATE_HINT = "use --no-chat-template to feed prompts as raw text"


@dataclass
class Tokenizer:
    """A model's tokenizer: text <-> ids, chat rendering, and the ids generation needs (stop on any of
    eos_ids, pad batches with pad_id). Build it with Tokenizer.from_dir."""

    backend: tokenizers.Tokenizer
    chat_template: str | None
    special_tokens: dict[str, str]  # e.g. {"eos_token": "<|im_end|>"}; the template sees them by name
    eos_ids: list[int]
    pad_id: int
    bos_id: int | None
    vocab_size: int  # largest token id + 1; a model's embedding table may have spare rows beyond it
    path: str

    @classmethod
    def from_dir(cls, path: str) -> "Tokenizer":
        """Load the tokenizer of the model stored in directory `path`."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"tokenizer directory {path!r} does not exist")
        tokenizer_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            found = ", ".join(sorted(os.listdir(path))) or "nothing"
            raise FileNotFoundError(f"no tokenizer.json in {path} (found: {found}). minirl reads only the fast-"
                                    "tokenizer file; transformers can write one: "
                                    "AutoTokenizer.from_pretrained(dir).save_pretrained(dir)")
        try:
            backend = tokenizers.Tokenizer.from_file(tokenizer_file)
        except Exception as e:  # the tokenizers library's own error does not name the file
            raise ValueError(f"{tokenizer_file}: the tokenizers library cannot read it ({e})") from None
        config = _read_json(path, "tokenizer_config.json")
        generation_config = _read_json(path, "generation_config.json")
        special_tokens = _special_tokens(config, _read_json(path, "special_tokens_map.json"))

        def token_id(name: str) -> int | None:  # of special token `name` (eos_token, ...); None if unnamed
            if (token := special_tokens.get(name)) is None:
                return None
            if (found := backend.token_to_id(token)) is None:
                raise ValueError(f"{name} {token!r} of {path} is not in the vocabulary of its tokenizer.json")
            return found

        generation_eos = generation_config.get("eos_token_id")
        generation_eos = generation_eos if isinstance(generation_eos, list) else [generation_eos]
        # The tokenizer's own EOS first, then generation_config's, without duplicates.
        eos_ids = list(dict.fromkeys(int(i) for i in [token_id("eos_token"), *generation_eos] if i is not None))
        if not eos_ids:
            raise ValueError(f"no end-of-sequence token in {path}: expected eos_token in tokenizer_config.json or "
                             "special_tokens_map.json, or eos_token_id in generation_config.json")
        pad_id = token_id("pad_token")
        return cls(backend, _chat_template(path, config), special_tokens, eos_ids,
                   eos_ids[0] if pad_id is None else pad_id, token_id("bos_token"),
                   max(backend.get_vocab(with_added_tokens=True).values()) + 1, path)

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; add_special_tokens adds what the post-processor puts around it (Llama: BOS)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of token ids (a list, or anything iterable of ints such as a 1-D tensor)."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render a conversation to text as transformers' apply_chat_template(tokenize=False) does;
        add_generation_prompt appends an assistant turn's header, so the continuation is the reply."""
        if self.chat_template is None:
            raise ValueError(f"{self.path} has no chat template (no chat_template.jinja, and none in "
                             f"tokenizer_config.json); {CHAT_TEMPLATE_HINT}")
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"messages must be a non-empty list of dicts, got {messages!r}")
        for message in messages:
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise ValueError(f"each message must be a dict with a 'role' string, got {message!r}")
        # Like transformers, drop keys set to None: templates test for a key, not for None.
        messages = [{k: v for k, v in message.items() if v is not None} for message in messages]
        try:
            return _compile(self.chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                       **self.special_tokens)
        except jinja2.TemplateError as e:
            raise ValueError(f"the chat template of {self.path} failed on these messages: {e}") from e

    def encode_prompt(self, prompt: str | list[dict], chat: bool) -> list[int]:
        """Token ids to feed the model for one prompt. chat=True: a string becomes one user message, and
        the rendered conversation is encoded without special tokens (templates write their own BOS, as
        in transformers); chat=False: the string as is, plus what the tokenizer's post-processor adds."""
        if chat:
            if isinstance(prompt, str):
                prompt = [{"role": "user", "content": prompt}]
            return self.encode(self.apply_chat_template(prompt, add_generation_prompt=True))
        if not isinstance(prompt, str):
            raise TypeError(f"a raw (non-chat) prompt must be a str, got {type(prompt).__name__}")
        return self.encode(prompt, add_special_tokens=True)


def _read_json(path: str, name: str) -> dict:
    """Contents of an optional JSON file in `path`, {} if it is absent; a bad one is an error naming it."""
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        return {}
    with open(file, encoding="utf-8") as f:
        try:
            value = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file}: malformed JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(value).__name__}")
    return value


def _token_text(value) -> str | None:
    """A special token is written either as its text or as {"content": text, ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_tokens(config: dict, special_tokens_map: dict) -> dict[str, str]:
    """Named special tokens ("bos_token", "eos_token", model-specific "*_token"s), which chat
    templates read as variables. tokenizer_config.json wins over the older special_tokens_map.json."""
    return {key: text for source in (special_tokens_map, config) for key, value in source.items()
            if key.endswith("_token") and (text := _token_text(value)) is not None}


def _chat_template(path: str, config: dict) -> str | None:
    """The chat template source: chat_template.jinja if present (newer transformers saves it
    there), else tokenizer_config.json's chat_template, a string or a list of named templates."""
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t["name"]: t["template"] for t in template}
        if "default" not in named:
            raise ValueError(f"tokenizer_config.json of {path} has chat templates {sorted(named)} but none "
                             f"named 'default'; {CHAT_TEMPLATE_HINT}")
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise ValueError(f"chat_template in tokenizer_config.json of {path} must be a string or a list, "
                         f"got {type(template).__name__}")
    return template


def _raise_exception(message: str):
    """Templates call raise_exception('...') to reject conversations they cannot format."""
    raise jinja2.TemplateError(message)


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    """Compile a chat template in the environment transformers renders it in. Templates come from
    downloaded model files, so they run sandboxed; trim_blocks and lstrip_blocks remove the newlines and
    indentation around {% %} tags, which template authors rely on."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    # Jinja's own tojson escapes <, >, & and ' for HTML, which would change the prompt text: plain JSON.
    env.filters["tojson"] = functools.partial(json.dumps, ensure_ascii=False)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)  # Llama 3.1+: today's date
    return env.from_string(template)
