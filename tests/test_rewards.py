"""Answer extraction, matching and reward lookup."""

import numpy as np
import pytest

from minirl.rewards import (
    checked_reward,
    exact_reward,
    extract_boxed,
    extract_last_number,
    get_reward_fn,
    math_reward,
)

FLOAT32_MAX = float(np.finfo(np.float32).max)


def test_extract_boxed():
    assert extract_boxed(r"so \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert extract_boxed(r"\boxed{1} then \boxed{ 2 }") == "2"
    assert extract_boxed(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"
    # the last box is cut off: fall back to the earlier complete one
    assert extract_boxed(r"\boxed{7} ... \boxed{\frac{3}{4}") == "7"
    assert extract_boxed("no box here 5") is None


def test_extract_last_number():
    assert extract_last_number("2 apples and 3 pears, total 5.") == "5"
    assert extract_last_number("costs $1,234,567 in total") == "1,234,567"
    assert extract_last_number("it drops to -3.25 degrees") == "-3.25"
    assert extract_last_number("we get 3-5") == "5"  # a minus after a digit is subtraction
    assert extract_last_number("ratio is 3/4") == "3/4"
    assert extract_last_number("1,2,3") == "3"  # not a thousands group
    assert extract_last_number("no digits") is None


@pytest.mark.parametrize(
    "completion, answer, reward",
    [
        (r"The answer is $\boxed{\frac{1}{2}}$.", "0.5", 1.0),
        (r"\boxed{\dfrac{1}{2}}", r"\frac{1}{2}", 1.0),
        (r"\boxed{3/4}", "0.75", 1.0),
        (r"\boxed{-\frac{1}{4}}", "-0.25", 1.0),
        (r"\boxed{2} but maybe 3", "2", 1.0),  # the box wins over the last number
        ("So she pays $1,200.", "1200", 1.0),
        ("The total is 1200", "1,200", 1.0),
        ("x = -7", "-7", 1.0),
        ("x = 7", "-7", 0.0),
        ("about 2.50 dollars", "2.5", 1.0),
        ("The result is 18.0", "18", 1.0),
        ("0.3333333333", "1/3", 1.0),  # within the 1e-9 relative tolerance
        ("1000001", "1000000", 0.0),  # but not looser than that
        (r"\boxed{\text{(B)}}", "(B)", 1.0),  # non-numeric: normalised strings
        (r"\boxed{x+1}", "x + 1", 1.0),
        (r"\boxed{x+2}", "x+1", 0.0),
        ("I don't know.", "4", 0.0),
    ],
)
def test_math_reward(completion, answer, reward):
    assert math_reward("prompt", completion, answer) == reward


def test_exact_reward():
    assert exact_reward("p", "  Paris\n", "Paris") == 1.0
    assert exact_reward("p", "paris", "Paris") == 0.0
    assert exact_reward("p", "Paris.", "Paris") == 0.0


def test_get_reward_fn_builtin():
    assert get_reward_fn("math") is math_reward
    assert get_reward_fn("exact") is exact_reward


def test_get_reward_fn_from_file(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(
        "def length(prompt, completion, answer):\n"
        "    return float(len(completion))\n"
        "NOT_CALLABLE = 3\n"
    )
    assert get_reward_fn(f"{path}:length")("p", "abcd", "a") == 4.0
    with pytest.raises(ValueError, match="no attribute 'missing'"):
        get_reward_fn(f"{path}:missing")
    with pytest.raises(ValueError, match="not callable"):
        get_reward_fn(f"{path}:NOT_CALLABLE")


def test_get_reward_fn_from_module():
    fn = get_reward_fn("minirl.rewards:exact_reward")
    assert fn("p", "a", "a") == 1.0


def test_get_reward_fn_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown reward 'nope'.*exact, math"):
        get_reward_fn("nope")
    with pytest.raises(ValueError, match="cannot import 'no_such_module_xyz'.*ModuleNotFoundError"):
        get_reward_fn("no_such_module_xyz:fn")
    with pytest.raises(ValueError, match="cannot import .*FileNotFoundError"):
        get_reward_fn(f"{tmp_path / 'absent.py'}:fn")
    broken = tmp_path / "broken.py"
    broken.write_text("def f(:\n")
    with pytest.raises(ValueError, match="cannot import .*SyntaxError"):
        get_reward_fn(f"{broken}:f")


@pytest.mark.parametrize("good, value", [
    (True, 1.0),  # a bool is 0 or 1
    (np.bool_(True), 1.0),  # numpy's too: `np.array(a) == b` gives one
    (np.float32(0.5), 0.5),
    (np.int64(-2), -2.0),
    (2, 2.0),
    (-FLOAT32_MAX, -FLOAT32_MAX),  # the float32 range's ends are finite
])
def test_checked_reward_passes_finite_numbers_as_floats(good, value):
    got = checked_reward(lambda p, c, a: good, "mod:fn", 0, "p", "c", "a")
    assert got == value and type(got) is float
    assert checked_reward(exact_reward, "exact", 3, "p", "a", "a") == 1.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), None, "1.0", [1.0], np.array([1.0]),
                                 1e39, -1e39, pytest.param(10**400, id="10**400")])  # 1e39 is inf in float32, 10**400 even in float64
def test_checked_reward_rejects_non_finite_and_non_numbers(bad):
    with pytest.raises(ValueError) as info:
        checked_reward(lambda p, c, a: bad, "my_reward.py:score", 17, "p", "c", "a")
    msg = str(info.value)
    assert "'my_reward.py:score'" in msg and "prompt 17" in msg and repr(bad) in msg


@pytest.mark.parametrize("code", [0, 1, None])
def test_sys_exit_inside_a_reward_is_an_error_naming_it(tmp_path, code):
    """A reward (or its module, while it is imported) that calls sys.exit() would end the run with no
    message, with exit code 0 for sys.exit(0): it is a ValueError naming the reward instead."""
    def quits(prompt, completion, answer):
        raise SystemExit(code)

    with pytest.raises(ValueError, match=rf"reward 'mod:quits' on prompt 4 called sys.exit\({code}\)") as info:
        checked_reward(quits, "mod:quits", 4, "p", "c", "a")
    assert isinstance(info.value.__cause__, SystemExit)
    module = tmp_path / "quitting.py"
    module.write_text(f"import sys\nsys.exit({code})\n")
    with pytest.raises(ValueError, match=rf"reward '.*quitting.py:f': cannot import .* \(it called sys.exit\({code}\)\)"):
        get_reward_fn(f"{module}:f")


def test_checked_reward_names_an_exception_inside_the_reward():
    def broken(prompt, completion, answer):
        return 1 / 0

    with pytest.raises(ValueError, match=r"'mod:broken' on prompt 5 raised ZeroDivisionError") as info:
        checked_reward(broken, "mod:broken", 5, "p", "c", "a")
    assert isinstance(info.value.__cause__, ZeroDivisionError)  # the user's traceback is kept
