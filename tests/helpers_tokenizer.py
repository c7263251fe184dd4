"""Tiny Hugging Face tokenizer directories for tests, built offline with the `tokenizers` library.

A byte-level BPE is trained in memory on a few sentences, so every string can be encoded, the
vocabulary stays small (a few hundred ids, cheap for tiny test models) and the files are the
ones a real model directory has, readable by transformers.AutoTokenizer and by minirl alike.
"""

import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",  # ChatML (Qwen)
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",  # Llama 3
]

TRAINING_TEXT = [
    "You are a helpful assistant.",
    "What is 2 + 3? The answer is 5.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "Let's think step by step: first add the numbers, then check the result.",
    "Hello, world! How are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
]

# ChatML in the manner of Qwen: a default system turn, tool calls rendered as JSON.
CHATML_TEMPLATE = """\
{%- if messages[0]['role'] != 'system' %}
{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{{- '<|im_start|>' + message['role'] + '\\n' }}
{%- if message['content'] is defined %}{{ message['content'] }}{% endif %}
{%- for call in message.get('tool_calls', []) %}
{{- '\\n<tool_call>\\n' + call | tojson + '\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Llama 3 style: BOS written by the template, header tokens, strict user/assistant alternation.
LLAMA3_TEMPLATE = """\
{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] %}
    {%- set turns = messages[1:] %}
{%- else %}
    {%- set system = 'Year: ' + strftime_now('%Y') %}
    {%- set turns = messages %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system + '<|eot_id|>' }}
{%- for message in turns %}
    {%- if message['role'] not in ['user', 'assistant'] %}
        {{- raise_exception('unsupported role ' + message['role']) }}
    {%- endif %}
    {%- if (message['role'] == 'user') != (loop.index0 is even) %}
        {{- raise_exception('turns must alternate user, assistant, user, ...') }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""


def make_test_tokenizer(
    path,
    chat_template: str | list[dict] | None = CHATML_TEMPLATE,
    *,
    bos_token: str | None = None,
    eos_token: str = "<|im_end|>",
    pad_token: str | None = "<|endoftext|>",
    generation_eos: tuple[str, ...] = ("<|im_end|>", "<|endoftext|>"),
    vocab_size: int = 320,
) -> str:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and
    generation_config.json into directory `path` (created if needed) and return it.

    The defaults are Qwen-like (no BOS, ChatML, <|im_end|> and <|endoftext|> both stop). With
    bos_token set, the post-processor prepends it when special tokens are added, as Llama's does.
    special_tokens_map.json writes tokens as {"content": ...} dicts, the way transformers saves them.
    """
    os.makedirs(path, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT, trainer=trainer)
    if bos_token is None:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    else:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B",
            special_tokens=[(bos_token, tokenizer.token_to_id(bos_token))],
        )
    tokenizer.save(os.path.join(path, "tokenizer.json"))

    named = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token}
    named = {key: token for key, token in named.items() if token is not None}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "model_max_length": 4096, **named}
    if chat_template is not None:
        config["chat_template"] = chat_template
    token_dict = dict(lstrip=False, normalized=False, rstrip=False, single_word=False)
    special_tokens_map = {key: {"content": token, **token_dict} for key, token in named.items()}
    eos_ids = [tokenizer.token_to_id(token) for token in generation_eos]
    generation_config = {"eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids}
    if bos_token is not None:
        generation_config["bos_token_id"] = tokenizer.token_to_id(bos_token)
    for name, content in [("tokenizer_config.json", config), ("special_tokens_map.json", special_tokens_map),
                          ("generation_config.json", generation_config)]:
        with open(os.path.join(path, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2, ensure_ascii=False)
    return str(path)
