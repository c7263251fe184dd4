"""minirl.tokenizer against transformers' AutoTokenizer reading the same directory."""

import json
import os

import jinja2
import pytest
from helpers_tokenizer import CHATML_TEMPLATE, LLAMA3_TEMPLATE, make_test_tokenizer
from transformers import AutoTokenizer

from minirl.tokenizer import Tokenizer

LLAMA3 = dict(chat_template=LLAMA3_TEMPLATE, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token=None,
              generation_eos=("<|end_of_text|>", "<|eot_id|>"))

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 3?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, world!"}],
    [
        {"role": "system", "content": "You add numbers."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "The answer is 5."},
        {"role": "user", "content": "  And 48 + 24 — über <b>&</b>?\n"},
    ],
]

# Exercise what transformers' template environment adds to plain Jinja.
FEATURE_TEMPLATES = {
    "tojson": "{{ messages | tojson }}|{{ messages[0] | tojson(indent=2) }}|{{ messages | tojson(sort_keys=True) }}",
    "special tokens as variables": "{{ bos_token }}{{ eos_token }}{{ pad_token }}{{ unk_token is defined }}",
    "loop controls": "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}",
    "namespace and trim": "{% set ns = namespace(n=0) %}\n  {% for m in messages %}\n    {% set ns.n = ns.n + 1 %}\n"
                          "  {% endfor %}\n{{ ns.n }} {{ strftime_now('%Y') }}\n",
}


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    path = make_test_tokenizer(tmp_path_factory.mktemp("chatml"))
    return Tokenizer.from_dir(path), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    path = make_test_tokenizer(tmp_path_factory.mktemp("llama3"), **LLAMA3)
    return Tokenizer.from_dir(path), AutoTokenizer.from_pretrained(path)


def hf_ids(encoding) -> list[int]:
    return encoding["input_ids"] if not isinstance(encoding, list) else encoding


@pytest.mark.parametrize("style", ["chatml", "llama3"])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(style, conversation, add_generation_prompt, request):
    ours, hf = request.getfixturevalue(style)
    expected = hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt) == expected


def test_tool_calls_as_json_and_none_content_match_transformers(chatml):
    ours, hf = chatml
    conversation = [
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"name": "weather", "arguments": {"city": "Zürich", "units": "<°C>"}}]},
    ]
    expected = hf.apply_chat_template(conversation, tokenize=False)
    assert "Zürich" in expected and "None" not in expected
    assert ours.apply_chat_template(conversation, add_generation_prompt=False) == expected


@pytest.mark.parametrize("name", list(FEATURE_TEMPLATES))
def test_template_environment_matches_transformers(name, tmp_path):
    path = make_test_tokenizer(tmp_path, FEATURE_TEMPLATES[name], bos_token="<|begin_of_text|>")
    conversation = [{"role": "system", "content": "ü \"quoted\" <tag>"}, {"role": "user", "content": "Hi & bye"}]
    expected = AutoTokenizer.from_pretrained(path).apply_chat_template(conversation, tokenize=False)
    assert Tokenizer.from_dir(path).apply_chat_template(conversation, add_generation_prompt=False) == expected


@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_encode_prompt_matches_transformers(style, request):
    ours, hf = request.getfixturevalue(style)
    for conversation in CONVERSATIONS:
        expected = hf_ids(hf.apply_chat_template(conversation, add_generation_prompt=True))
        assert ours.encode_prompt(conversation, chat=True) == expected
    question = "What is 48 + 24?"
    user_turn = [{"role": "user", "content": question}]
    assert ours.encode_prompt(question, chat=True) == hf_ids(hf.apply_chat_template(user_turn, add_generation_prompt=True))
    assert ours.encode_prompt(question, chat=False) == hf(question)["input_ids"]
    assert ours.encode(question) == hf(question, add_special_tokens=False)["input_ids"]


def test_bos_written_once(chatml, llama3):
    ours, _ = llama3
    chat_ids = ours.encode_prompt("Hi", chat=True)
    assert chat_ids[0] == ours.bos_id and chat_ids.count(ours.bos_id) == 1
    assert ours.encode_prompt("Hi", chat=False)[0] == ours.bos_id
    ours, _ = chatml
    assert ours.bos_id is None
    assert ours.encode_prompt("Hi", chat=False) == ours.encode("Hi")


def test_special_ids(chatml, llama3):
    ours, hf = chatml
    token = hf.convert_tokens_to_ids
    assert ours.eos_ids == [token("<|im_end|>"), token("<|endoftext|>")]
    assert ours.eos_ids[0] == hf.eos_token_id
    assert ours.pad_id == hf.pad_token_id == token("<|endoftext|>")
    assert ours.vocab_size == len(hf)

    ours, hf = llama3
    assert ours.eos_ids == [token("<|eot_id|>"), token("<|end_of_text|>")]  # union, tokenizer's EOS first
    assert hf.pad_token_id is None and ours.pad_id == token("<|eot_id|>")  # falls back to the first EOS
    assert ours.bos_id == hf.bos_token_id


def test_generation_config_with_single_id_and_no_file(tmp_path):
    path = make_test_tokenizer(tmp_path, generation_eos=("<|endoftext|>",))
    with open(os.path.join(path, "generation_config.json")) as f:
        assert isinstance(json.load(f)["eos_token_id"], int)
    tokenizer = Tokenizer.from_dir(path)
    assert tokenizer.decode(tokenizer.eos_ids, skip_special_tokens=False) == "<|im_end|><|endoftext|>"
    os.remove(os.path.join(path, "generation_config.json"))
    assert Tokenizer.from_dir(path).eos_ids == [tokenizer.eos_ids[0]]


def test_special_tokens_only_in_special_tokens_map(tmp_path):
    """Older model directories keep the tokens in special_tokens_map.json, as {"content": ...} dicts."""
    path = make_test_tokenizer(tmp_path, **LLAMA3)
    config_file = os.path.join(path, "tokenizer_config.json")
    with open(config_file) as f:
        config = json.load(f)
    for key in ["bos_token", "eos_token"]:
        del config[key]
    with open(config_file, "w") as f:
        json.dump(config, f)
    ours, hf = Tokenizer.from_dir(path), AutoTokenizer.from_pretrained(path)
    assert (ours.bos_id, ours.eos_ids[0]) == (hf.bos_token_id, hf.eos_token_id)
    conversation = CONVERSATIONS[1]
    assert ours.apply_chat_template(conversation) == hf.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=True)


def test_template_file_and_named_templates(tmp_path):
    """chat_template.jinja wins over tokenizer_config.json; a list of named templates uses 'default'."""
    path = make_test_tokenizer(tmp_path, [{"name": "default", "template": CHATML_TEMPLATE},
                                          {"name": "tool_use", "template": "unused"}])
    conversation = CONVERSATIONS[2]
    expected = AutoTokenizer.from_pretrained(path).apply_chat_template(conversation, tokenize=False)
    assert Tokenizer.from_dir(path).apply_chat_template(conversation, add_generation_prompt=False) == expected

    with open(os.path.join(path, "chat_template.jinja"), "w") as f:
        f.write(LLAMA3_TEMPLATE)
    expected = AutoTokenizer.from_pretrained(path).apply_chat_template(conversation, tokenize=False)
    assert "<|start_header_id|>" in expected
    assert Tokenizer.from_dir(path).apply_chat_template(conversation, add_generation_prompt=False) == expected


def test_decode_round_trip(chatml, llama3):
    text = "Natalia sold 48 clips — über 😀!\n  def add(a, b):"
    for ours, hf in [chatml, llama3]:
        assert ours.decode(ours.encode(text)) == text
        ids = ours.encode_prompt(text, chat=True)
        for skip in [True, False]:
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_no_chat_template(tmp_path):
    path = make_test_tokenizer(tmp_path, chat_template=None)
    tokenizer = Tokenizer.from_dir(path)
    assert not tokenizer.has_chat_template
    assert tokenizer.encode_prompt("What is 2 + 3?", chat=False) == tokenizer.encode("What is 2 + 3?")
    with pytest.raises(ValueError, match="--no-chat-template") as error:
        tokenizer.encode_prompt("What is 2 + 3?", chat=True)
    assert str(path) in str(error.value)


def test_missing_tokenizer_json(tmp_path):
    path = make_test_tokenizer(tmp_path)
    os.remove(os.path.join(path, "tokenizer.json"))
    with pytest.raises(FileNotFoundError, match="no tokenizer.json .*found: generation_config.json, "
                                                "special_tokens_map.json, tokenizer_config.json"):
        Tokenizer.from_dir(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_dir(os.path.join(path, "nope"))


def test_bad_input(chatml, llama3, tmp_path):
    ours, hf = llama3
    conversation = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(jinja2.TemplateError, match="alternate"):
        hf.apply_chat_template(conversation, tokenize=False)
    with pytest.raises(ValueError, match="alternate"):
        ours.apply_chat_template(conversation)
    ours, _ = chatml
    with pytest.raises(TypeError, match="raw"):
        ours.encode_prompt([{"role": "user", "content": "a"}], chat=False)
    with pytest.raises(ValueError, match="non-empty"):
        ours.apply_chat_template([])
    with pytest.raises(ValueError, match="'role'"):
        ours.apply_chat_template([{"content": "a"}])

    path = make_test_tokenizer(tmp_path / "named", [{"name": "tool_use", "template": "x"}])
    with pytest.raises(ValueError, match="'default'"):
        Tokenizer.from_dir(path)
    path = make_test_tokenizer(tmp_path / "eos", eos_token="<|not-a-token|>")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        Tokenizer.from_dir(path)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "generation_config.json"])
def test_a_malformed_file_is_one_error_naming_it(tmp_path, name):
    path = make_test_tokenizer(tmp_path)
    file = os.path.join(path, name)
    with open(file) as f:
        text = f.read()
    with open(file, "w") as f:
        f.write(text[: len(text) // 2])  # cut short, as by a broken download
    with pytest.raises(ValueError, match=f"{file}: ") as info:
        Tokenizer.from_dir(path)
    assert "\n" not in str(info.value)
