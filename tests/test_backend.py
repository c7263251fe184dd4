"""The contract both rollout backends share (minirl/backend.py): seeds, the interface, the checks."""

import inspect
import itertools

import pytest
import torch

from minirl.backend import RolloutBackend, SamplingParams, check_request, checked_weights, sample_seed
from minirl.generate import Generator
from minirl.vllm_backend import VLLMGenerator


def test_sample_seeds_are_distinct_and_fit_every_backend():
    seeds = {sample_seed(*key) for key in itertools.product(range(3), repeat=4)}
    assert len(seeds) == 81 and all(0 <= x < 2**63 for x in seeds)  # vLLM takes 63-bit seeds
    assert sample_seed(5, 1, 2, 3) == sample_seed(5, 1, 2, 3)


@pytest.mark.parametrize("cls", [Generator, VLLMGenerator])
def test_both_backends_have_the_declared_interface(cls):
    for name in ("update_weights", "generate", "release", "close"):
        want = inspect.signature(getattr(RolloutBackend, name))
        got = inspect.signature(getattr(cls, name))
        assert list(got.parameters) == list(want.parameters), f"{cls.__name__}.{name}{got} != {want}"
        assert [p.default for p in got.parameters.values()] == [p.default for p in want.parameters.values()]
    assert "self.dtype" in inspect.getsource(cls.__init__)


def test_check_request():
    params = SamplingParams(4, seed=3)
    assert check_request([[1, 2], [3]], params, 10, None) == [sample_seed(3, 0, 0, 0), sample_seed(3, 0, 1, 0)]
    assert check_request([[1]], params, 10, [42]) == [42]
    for prompts, seeds, message in [([[1], []], None, "prompt 1 is empty"), ([[1, 10]], None, "vocabulary"),
                                    ([[1]], [1, 2], "one seed per prompt")]:
        with pytest.raises(ValueError, match=message):
            check_request(prompts, params, 10, seeds)
    with pytest.raises(ValueError, match="top_p"):
        check_request([[1]], SamplingParams(4, top_p=0.0), 10, None)


def test_checked_weights():
    shapes = {"a": torch.Size([2]), "b": torch.Size([3])}
    good = [("a", torch.zeros(2)), ("b", torch.zeros(3))]
    assert [n for n, _ in checked_weights(good, shapes)] == ["a", "b"]
    for bad, error, message in [(good[:1], ValueError, "1 parameters were not sent, e.g. 'b'"),
                                (good + good[:1], ValueError, "'a' was sent twice"),
                                ([("c", torch.zeros(1))], KeyError, "'c' is not a parameter"),
                                ([("a", torch.zeros(3))], ValueError, r"'a' has shape \[3\], expected \[2\]")]:
        with pytest.raises(error, match=message):
            list(checked_weights(bad, shapes))
