import json

import pytest

from helpers_tokenizer import make_test_tokenizer
from minirl.data import PromptDataset, read_records
from minirl.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    make_test_tokenizer(str(d))
    return Tokenizer.from_dir(str(d))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_malformed_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a"}\n\n{"prompt": oops}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: malformed JSON"):
        read_records(str(p))
    p.write_text('[1, 2]\n')
    with pytest.raises(ValueError, match=r":1: expected a JSON object"):
        read_records(str(p))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_records(str(tmp_path / "nope.jsonl"))


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a"}\n{"prompt": "\u00e9"}\n'.encode("latin-1"), r"d\.jsonl:2: not UTF-8 text \(byte 0xe9 at column 13\)"),
    ('{"prompt": "a"}\n'.encode("utf-16"), r"d\.jsonl:1: not UTF-8 text \(byte 0xff at column 1\)"),
    (bytes(range(256)), r"d\.jsonl:1: (not UTF-8|malformed JSON)"),
])
def test_a_file_that_is_not_utf8_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_records(str(path))


def test_utf8_with_a_byte_order_mark_reads(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes('{"prompt": "\u00e9"}\n{"prompt": "b"}\n'.encode("utf-8-sig"))
    assert read_records(str(path)) == [{"prompt": "\u00e9"}, {"prompt": "b"}]


def test_a_directory_is_not_a_data_file(tmp_path):
    with pytest.raises(ValueError, match=rf"{tmp_path} is a directory, not a data file"):
        read_records(str(tmp_path))


@pytest.mark.parametrize("chat", [True, False])
def test_an_empty_prompt_names_its_row_at_load(tmp_path, tok, chat):
    rows = [{"prompt": "fine", "answer": "1"}, {"prompt": "ok", "answer": "2"}, {"prompt": "", "answer": "3"}]
    with pytest.raises(ValueError, match=r"d\.jsonl: row 3, field 'prompt': the prompt is empty"):
        PromptDataset(write_jsonl(tmp_path / "d.jsonl", rows), tok, chat=chat)


def test_fingerprint_follows_the_prompts_not_the_file_name(tmp_path, tok):
    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(4)]
    a = PromptDataset(write_jsonl(tmp_path / "a.jsonl", rows), tok, chat=False)
    moved = PromptDataset(write_jsonl(tmp_path / "moved.jsonl", rows), tok, chat=False)
    fewer = PromptDataset(write_jsonl(tmp_path / "fewer.jsonl", rows[:3]), tok, chat=False)
    other_answer = PromptDataset(write_jsonl(tmp_path / "b.jsonl", rows[:3] + [{"prompt": "q3", "answer": "x"}]),
                                 tok, chat=False)
    assert a.fingerprint() == moved.fingerprint()
    assert len({a.fingerprint(), fewer.fingerprint(), other_answer.fingerprint()}) == 3


def test_dataset_filters_shuffles_and_resumes(tmp_path, tok):
    rows = [{"prompt": "hello " * (1 + i % 3), "answer": str(i)} for i in range(10)]
    rows.append({"prompt": "long " * 200, "answer": "x"})
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    ds = PromptDataset(path, tok, chat=False, max_prompt_len=50, seed=3)
    assert ds.dropped == 1 and len(ds.prompts) == 10
    first_epoch = [p.index for p in ds.next_batch(10)]
    assert sorted(first_epoch) == list(range(10))  # each prompt once per epoch
    assert first_epoch != list(range(10))  # shuffled
    ds.next_batch(3)  # into epoch 2
    state = ds.state_dict()
    expected = [p.index for p in ds.next_batch(12)]

    again = PromptDataset(path, tok, chat=False, max_prompt_len=50, seed=3)
    assert [p.index for p in again.next_batch(10)] == first_epoch  # seeded
    again.load_state_dict(state)
    assert [p.index for p in again.next_batch(12)] == expected  # exact resume across an epoch boundary
    other = PromptDataset(path, tok, chat=False, max_prompt_len=50, seed=4)
    assert [p.index for p in other.next_batch(10)] != first_epoch


def test_dataset_missing_field(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "hi"}])
    with pytest.raises(ValueError, match="row 1 has no field 'prompt'"):
        PromptDataset(path, tok, chat=False)


def test_dataset_answer_field_missing_everywhere_is_an_error(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "hi", "solution": "1"}, {"prompt": "yo", "solution": "2"}])
    with pytest.raises(ValueError, match=r"d\.jsonl: no row has the answer field 'answer'.*'solution'"):
        PromptDataset(path, tok, chat=False)
    ds = PromptDataset(path, tok, answer_field="solution", chat=False)
    assert [p.answer for p in ds.prompts] == ["1", "2"] and ds.missing_answers == 0


def test_dataset_counts_rows_without_an_answer(tmp_path, tok):
    rows = [{"prompt": "a", "answer": 3}, {"prompt": "b"}, {"prompt": "c", "answer": None},
            {"prompt": "d", "answer": ""}]
    ds = PromptDataset(write_jsonl(tmp_path / "d.jsonl", rows), tok, chat=False)
    assert ds.missing_answers == 2  # absent or null; an empty string is an answer
    assert [p.answer for p in ds.prompts] == ["3", "", "", ""]


@pytest.mark.parametrize("chat, prompt", [
    (True, 42),
    (True, {"role": "user", "content": "hi"}),  # one message, not a list of them
    (True, ["hi"]),
    (True, []),
    (False, [{"role": "user", "content": "hi"}]),  # messages need the chat template
])
def test_dataset_bad_prompt_names_the_row(tmp_path, tok, chat, prompt):
    rows = [{"prompt": "fine", "answer": "1"}, {"prompt": prompt, "answer": "2"}]
    with pytest.raises(ValueError, match=r"d\.jsonl: row 2, field 'prompt'"):
        PromptDataset(write_jsonl(tmp_path / "d.jsonl", rows), tok, chat=chat)


def test_dataset_accepts_chat_messages(tmp_path, tok):
    rows = [{"prompt": [{"role": "user", "content": "hi"}], "answer": "1"}, {"prompt": "plain", "answer": "2"}]
    ds = PromptDataset(write_jsonl(tmp_path / "d.jsonl", rows), tok, chat=True)
    assert len(ds.prompts) == 2 and ds.prompts[0].text == rows[0]["prompt"]
