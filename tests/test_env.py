"""minirl/env.py: loading an environment and checking what user code returns."""

import math

import numpy as np
import pytest

from minirl.config import TASKS, parse_config, validate
from minirl.env import EnvStep, checked_start, checked_step, load_env, stop_token_id
from minirl.tokenizer import Tokenizer

from helpers_tokenizer import make_test_tokenizer

ENVS = '''
class Good:
    stop = "!"
    def start(self, prompt, answer):
        self.answer = answer
    def step(self, text, token_ids):
        return (None, 1.0, True)

class NoStop:
    def start(self, prompt, answer): pass
    def step(self, text, token_ids): pass

class LongStop(Good):
    stop = "a long stop"

class BadInit:
    stop = "!"
    def __init__(self):
        raise RuntimeError("no tools here")
    def start(self, prompt, answer): pass
    def step(self, text, token_ids): pass

NOT_A_CLASS = 3
'''


@pytest.fixture(scope="module")
def envs(tmp_path_factory):
    path = tmp_path_factory.mktemp("envs") / "envs.py"
    path.write_text(ENVS)
    return str(path)


def test_load_env_from_file_and_module(envs):
    env = load_env(f"{envs}:Good")()
    checked_start(env, "good", 0, "p", "a")
    assert checked_step(env, "good", 0, "text", [1, 2]) == EnvStep(None, 1.0, True)
    assert load_env("minirl.tools_task.calculator:Calculator")().stop == "]"


@pytest.mark.parametrize("name, message", [
    ("NoStop", "needs a `stop` string"),
    ("BadInit", "BadInit\\(\\) raised RuntimeError: no tools here"),
    ("NOT_A_CLASS", "not callable"),
    ("Missing", "has no attribute 'Missing'"),
])
def test_bad_env_is_one_clear_error(envs, name, message):
    with pytest.raises(ValueError, match=message):
        load_env(f"{envs}:{name}")


def test_stop_must_be_one_token(envs, tmp_path):
    make_test_tokenizer(str(tmp_path))
    tok = Tokenizer.from_dir(str(tmp_path))
    assert stop_token_id(f"{envs}:Good", tok) == tok.encode("!")[0]
    with pytest.raises(ValueError, match="must be one"):
        stop_token_id(f"{envs}:LongStop", tok)


class Scripted:
    """Returns whatever it is given to return, or raises it."""

    stop = "!"

    def __init__(self, out):
        self.out = out

    def start(self, prompt, answer):
        if isinstance(self.out, BaseException):
            raise self.out

    def step(self, text, token_ids):
        token_ids.append(-1)  # must not reach the caller's ids
        if isinstance(self.out, BaseException):
            raise self.out
        return self.out


@pytest.mark.parametrize("out, message", [
    (KeyError("x"), "on prompt 7: step raised KeyError"),
    ((3, 1.0, False), "observation 3 \\(int\\) is not a string or None"),
    ((b"bytes", 1.0, False), "is not a string or None"),
    (("ok", math.nan, False), "reward nan \\(float\\) is not a number finite in float32"),
    (("ok", 1e39, False), "reward 1e\\+39 \\(float\\) is not a number finite in float32"),
    (SystemExit(0), "on prompt 7: step called sys.exit\\(0\\)"),
    (("ok", None, False), "reward None"),
    (("ok", 1.0, "yes"), "done 'yes' \\(str\\) is not a bool"),
    (("ok", 1.0), "must return \\(observation, reward, done\\)"),
    (None, "must return"),
])
def test_bad_step_is_one_clear_error(out, message):
    with pytest.raises(ValueError, match=f"env 'mod:Env' .*{message}"):
        checked_step(Scripted(out), "mod:Env", 7, "text", [1])


def test_checked_step_passes_good_values_and_copies_ids():
    ids = [1, 2]
    assert checked_step(Scripted(("obs", 2, False)), "e", 0, "t", ids) == EnvStep("obs", 2.0, False)
    assert checked_step(Scripted(("obs", np.bool_(True), False)), "e", 0, "t", ids) == EnvStep("obs", 1.0, False)
    assert ids == [1, 2]
    with pytest.raises(ValueError, match="start raised ValueError"):
        checked_start(Scripted(ValueError("bad row")), "e", 0, "p", "a")


@pytest.mark.parametrize("flags, message", [
    (["--max-turns", "0"], r"--max-turns must be in \[1, inf\)"),
    (["--episode-tokens", "-1"], r"--episode-tokens must be in \[0, inf\)"),
    (["--env", "no_such_module_xyz:Env"], "env 'no_such_module_xyz:Env': cannot import"),
])
def test_bad_multi_turn_flags_fail_validation(flags, message):
    with pytest.raises(ValueError, match=message):
        validate(parse_config(["--task", "tools", *flags]))


def test_task_tools_fills_in_its_model_data_and_env():
    cfg = parse_config(["--task", "tools"])
    validate(cfg)
    assert cfg.data.model == TASKS["tools"] and cfg.data.data.startswith(TASKS["tools"])
    assert cfg.rollout.env == "minirl.tools_task.calculator:Calculator" and cfg.rollout.max_turns == 3
    with pytest.raises(ValueError, match="unknown --task 'nope'"):
        parse_config(["--task", "nope"])
