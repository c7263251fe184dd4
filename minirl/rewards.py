"""Verifiable rewards: score a completion against a known answer.

A reward function is any callable `(prompt, completion, answer) -> float`. Two are built in (`math`,
`exact`); anything else is named as `module:function`, where module is a dotted import path or a path to a
.py file. Callers score through `checked_reward`, so a NaN or a None from user code stops the run instead
of training on it, and call user code through `call_user`: its exception or `sys.exit()` is one error.
"""

import functools
import importlib
import importlib.util
import numbers
import re
from fractions import Fraction
from pathlib import Path
from typing import Callable

import numpy as np

RewardFn = Callable[[str, str, str], float]

# An optional sign (not after a word or ")", so "3-5" is "3" and "5"), then an
# integer with thousands commas or plain digits, then a fraction "/d" or decimals.
_NUMBER = re.compile(r"(?:(?<![\w)])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:/\d+|\.\d+)?")
_FRAC = re.compile(r"^(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}$")
_TEXT = re.compile(r"\\text\{([^{}]*)\}")
# Rewards become float32 tensors (advantages, loss): a larger one is inf there.
FLOAT32_MAX = float(np.finfo(np.float32).max)


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` whose braces balance, or None. Nested braces are fine
    (`\\boxed{\\frac{1}{2}}` -> `\\frac{1}{2}`); a box cut off by the length limit yields to an earlier one."""
    start = text.rfind("\\boxed{")
    while start != -1:
        body = start + len("\\boxed{")
        depth = 1
        for i in range(body, len(text)):
            depth += (text[i] == "{") - (text[i] == "}")
            if depth == 0:
                return text[body:i].strip()
        start = text.rfind("\\boxed{", 0, start)
    return None


def extract_last_number(text: str) -> str | None:
    """The last number in `text` ("-1,234.5", "3/4", "42"), or None."""
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _normalize(s: str) -> str:
    """Strip the formatting that does not change an answer: $, spaces, \\text{}, a final '.'."""
    s = _TEXT.sub(r"\1", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\!", "")
    s = re.sub(r"\s+", "", s).replace("$", "")
    return s.rstrip(".")


def _to_number(s: str) -> Fraction | None:
    """Parse a normalised answer as an exact number: "1,000", "-2.50", "3/4", "\\frac{3}{4}"."""
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    if m := _FRAC.match(s):
        s = f"{m[1]}{m[2]}/{m[3]}"
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(pred: str, answer: str) -> bool:
    """Equal as numbers (relative tolerance 1e-9) if both parse, else as normalised strings."""
    pred, answer = _normalize(pred), _normalize(answer)
    a, b = _to_number(pred), _to_number(answer)
    if a is not None and b is not None:
        # Fractions keep this exact: "0.5" == "1/2" and no float overflow on huge values.
        return abs(a - b) <= Fraction(1, 10**9) * max(abs(a), abs(b))
    return pred == answer


def math_reward(prompt: str, completion: str, answer: str) -> float:
    """1.0 if the final answer (last \\boxed{}, else last number) matches `answer`."""
    pred = extract_boxed(completion)
    if pred is None:
        pred = extract_last_number(completion)
    return 1.0 if pred is not None and answers_match(pred, answer) else 0.0


def exact_reward(prompt: str, completion: str, answer: str) -> float:
    """1.0 if the completion is the answer, up to surrounding whitespace."""
    return 1.0 if completion.strip() == answer.strip() else 0.0


BUILTIN_REWARDS: dict[str, RewardFn] = {"math": math_reward, "exact": exact_reward}


def get_reward_fn(name: str) -> RewardFn:
    """A built-in reward by name, or `module:function` from an import path or .py file."""
    choices = f"built-in rewards: {', '.join(sorted(BUILTIN_REWARDS))}, or 'module:function'"
    if name in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[name]
    return import_named(name, "reward", choices)


def import_named(name: str, what: str, choices: str):
    """The callable `attr` of `module:attr` (module: a dotted import path or a .py file), or one
    ValueError naming `what` (reward, env), the spec and what went wrong, then `choices`."""
    module_name, _, fn_name = name.rpartition(":")
    if not module_name or not fn_name:
        raise ValueError(f"unknown {what} {name!r}; {choices}")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except (Exception, SystemExit) as e:  # any failure inside user code is a bad spec; so is its sys.exit()
        why = f"it called sys.exit({e.code!r})" if isinstance(e, SystemExit) else f"{type(e).__name__}: {e}"
        raise ValueError(f"{what} {name!r}: cannot import {module_name!r} ({why}); {choices}") from e
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise ValueError(f"{what} {name!r}: {module_name!r} has no attribute {fn_name!r}; {choices}")
    if not callable(fn):
        raise ValueError(f"{what} {name!r}: {module_name}.{fn_name} is not callable; {choices}")
    return fn


def call_user(fn, where: str, *args):
    """`fn(*args)` for user code (a reward, an env): an exception it raises, or a `sys.exit()` it calls
    (which would end the run silently, maybe with code 0), is one ValueError that starts with `where`."""
    try:
        return fn(*args)
    except SystemExit as e:
        raise ValueError(f"{where} called sys.exit({e.code!r})") from e
    except Exception as e:
        raise ValueError(f"{where} raised {type(e).__name__}: {e}") from e


def as_reward(value) -> float | None:
    """`value` as a reward, or None when it is not one: a real number (Python's or numpy's, bools
    included: 0 or 1) that stays finite in float32, where the advantages and the loss hold it."""
    if isinstance(value, (numbers.Real, np.bool_)):
        try:
            value = float(value)
        except OverflowError:  # an int past float64's range
            return None
        if abs(value) <= FLOAT32_MAX:  # False for NaN and inf too
            return value
    return None


def checked_reward(fn: RewardFn, name: str, prompt_index: int, prompt: str, completion: str, answer: str) -> float:
    """`fn(prompt, completion, answer)` as a float, or a ValueError naming the reward spec `name`, the
    prompt's row `prompt_index` and what came back. A NaN or inf reward turns the group's advantages, then
    the loss and every weight, into NaN; a None or a string fails far from its cause."""
    where = f"reward {name!r} on prompt {prompt_index}"
    value = call_user(fn, where, prompt, completion, answer)
    reward = as_reward(value)
    if reward is None:
        raise ValueError(f"{where} returned {value!r} ({type(value).__name__}); a reward must be a number, "
                         f"finite in float32 (|reward| <= {FLOAT32_MAX:.3g})")
    return reward


def load_reward(name: str) -> Callable[[int, str, str, str], float]:
    """The reward `name` as the trainer scores with it: `(prompt_index, prompt, completion, answer)`,
    through `checked_reward`, so every error names the reward and the prompt."""
    return functools.partial(checked_reward, get_reward_fn(name), name)
