"""Config files and flags (minirl/config.py apply_overrides, parse_config): keys and types are checked."""

import json

import pytest

from minirl.config import TrainConfig, apply_overrides, parse_config


def write_config(tmp_path, text: str) -> str:
    path = tmp_path / "job.json"
    path.write_text(text)
    return str(path)


def test_flat_and_nested_values_and_flags_override_the_file(tmp_path):
    path = write_config(tmp_path, json.dumps({"steps": 3, "optim": {"lr": 1, "schedule": "cosine"},
                                              "export": False}))
    cfg = parse_config(["--config", path, "--lr", "2e-6", "--no-chat-template"])
    assert cfg.run.steps == 3 and cfg.optim.schedule == "cosine" and cfg.run.export is False
    assert cfg.optim.lr == 2e-6 and cfg.data.chat_template is False  # flags win over the file


def test_an_int_is_accepted_for_a_float_field():
    cfg = TrainConfig()
    apply_overrides(cfg, {"lr": 1, "temperature": 0}, "job.json")
    assert cfg.optim.lr == 1.0 and type(cfg.optim.lr) is float and type(cfg.rollout.temperature) is float


@pytest.mark.parametrize("key, value, expected", [
    ("export", "false", "bool"),  # a non-empty string would read as True
    ("steps", "2", "int"),
    ("steps", 2.0, "int"),
    ("steps", True, "int"),  # True is an int in Python, not in a config
    ("chat_template", 1, "bool"),
    ("lr", "1e-6", "float"),
    ("lr", None, "float"),
    ("model", 3, "str"),
])
def test_wrong_types_name_the_key_the_file_and_the_type(tmp_path, key, value, expected):
    path = write_config(tmp_path, json.dumps({key: value}))
    with pytest.raises(ValueError) as info:
        parse_config(["--config", path])
    msg = str(info.value)
    assert path in msg and repr(key) in msg and f"must be {expected}" in msg


def test_a_wrong_type_inside_a_section_is_caught_too(tmp_path):
    path = write_config(tmp_path, json.dumps({"run": {"steps": "2"}}))
    with pytest.raises(ValueError, match=r"job\.json: 'steps' must be int"):
        parse_config(["--config", path])


def test_malformed_json_names_the_file_and_line(tmp_path):
    path = write_config(tmp_path, '{"steps": 2,\n "lr": }\n')
    with pytest.raises(ValueError, match=r"job\.json:2:\d+: malformed JSON"):
        parse_config(["--config", path])


def test_a_list_or_a_scalar_is_not_a_config(tmp_path):
    for text, kind in (('[{"steps": 2}]', "list"), ("3", "int")):
        path = write_config(tmp_path, text)
        with pytest.raises(ValueError, match=rf"job\.json: expected a JSON object, got {kind}"):
            parse_config(["--config", path])


def test_a_section_that_is_not_an_object(tmp_path):
    path = write_config(tmp_path, json.dumps({"optim": 3}))
    with pytest.raises(ValueError, match=r"job\.json: section 'optim' must be an object"):
        parse_config(["--config", path])


def test_unknown_keys_and_a_missing_file(tmp_path):
    path = write_config(tmp_path, json.dumps({"stepz": 2}))
    with pytest.raises(ValueError, match=r"job\.json: unknown config keys \['stepz'\]"):
        parse_config(["--config", path])
    with pytest.raises(FileNotFoundError, match="config file not found: .*absent.json"):
        parse_config(["--config", str(tmp_path / "absent.json")])
