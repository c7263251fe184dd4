"""What both rollout backends share: the request, the answer, the interface and the checks.

The naive `generate.Generator` and the optional `vllm_backend.VLLMGenerator` both satisfy `RolloutBackend`
and check their input with the same functions, so the trainer and rollout.py are written once against
it, and a bad prompt or weight sync reads the same on either. Completion k of a prompt at a step samples
from its own stream, `sample_seed(seed, step, prompt, k)`, so a run does not depend on the layout.
"""

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

# The lowest temperature that is not 0 (greedy). Logits divided by less overflow (1e-40 gives inf - inf
# = NaN probabilities), and sampling that cold is greedy anyway; vLLM raises such values to it too.
MIN_TEMPERATURE = 0.01


@dataclass
class SamplingParams:
    max_new_tokens: int = 512
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off
    seed: int = 0  # row i of a generate call samples from sample_seed(seed, 0, i, 0), unless given its own
    stop_token_ids: tuple[int, ...] = ()  # end a row like EOS does (kept in the output): a multi-turn turn's end

    def check(self):
        """A ValueError naming the first setting out of range."""
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature < float("inf")):  # NaN fails too
            raise ValueError(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, inf), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")


@dataclass
class Completion:
    token_ids: list[int]  # ends with the EOS (or stop) id when finish_reason == "stop" (as vLLM returns it)
    logprobs: list[float]  # log-prob of each token under the processed distribution it was sampled from
    finish_reason: str  # "stop" (an EOS id) or "length" (max_new_tokens)


def sample_seed(seed: int, step: int, prompt_index: int, k: int) -> int:
    """The sampling seed of completion k of prompt `prompt_index` at `step` of a run seeded `seed`."""
    return (((seed * 1_000_003 + step) * 1_000_033 + prompt_index) * 1_009 + k) % (2**62)


class RolloutBackend(Protocol):
    """A copy of the policy that rollouts are sampled from, kept in step with the trainer's weights."""

    dtype: torch.dtype  # the inference dtype: the trainer casts the weights it streams in to it

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Every parameter, (our name, FULL tensor), exactly once (`checked_weights`)."""

    def generate(self, prompts: list[list[int]], params: SamplingParams, progress=None,
                 seeds: list[int] | None = None, stop: Callable[[], bool] | None = None,
                 limits: list[int] | None = None, follow_up: Callable | None = None,
                 max_context: int | None = None) -> list[Completion]:
        """One Completion per prompt, in order; `progress` has tqdm's `update(n)`. Prompt i samples from its own
        stream, `seeds[i]` (default `sample_seed(params.seed, 0, i, 0)`): a completion depends on its prompt,
        seed and limit only, not on the batching. A backend that works in batches asks `stop()` between them
        and, once it is True, returns the Completions done so far. `limits[i]` is prompt i's own
        max_new_tokens (`check_limits`), e.g. what is left of an episode's budget. `follow_up(i, completion)`,
        called as request i finishes (the prompts given, then the requests it added, counted in order), may
        return one more request (prompt, seed, limit): a multi-turn episode's next turn. Every request's
        prompt + limit fits in `max_context` tokens."""

    def release(self) -> None:
        """Give memory back to training until the next `update_weights`."""

    def close(self) -> None: ...


def check_request(prompts: list[list[int]], params: SamplingParams, vocab_size: int,
                  seeds: list[int] | None) -> list[int]:
    """Refuse a generate call that cannot work, with one clear error; returns one seed per prompt."""
    params.check()
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty: generation needs at least one prompt token")
        if min(p) < 0 or max(p) >= vocab_size:
            raise ValueError(f"prompt {i} has a token id outside the model's vocabulary [0, {vocab_size})")
    if seeds is None:
        return [sample_seed(params.seed, 0, i, 0) for i in range(len(prompts))]
    if len(seeds) != len(prompts):
        raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts; give one seed per prompt")
    return list(seeds)


def check_limits(limits: list[int] | None, n: int, max_new_tokens: int) -> list[int]:
    """One token limit per prompt, each in [1, max_new_tokens]; none given: max_new_tokens for every prompt."""
    if limits is None:
        return [max_new_tokens] * n
    if len(limits) != n or not all(1 <= x <= max_new_tokens for x in limits):
        raise ValueError(f"limits: give one per prompt, each in [1, max_new_tokens = {max_new_tokens}]")
    return list(limits)


def checked_weights(named_tensors: Iterable[tuple[str, torch.Tensor]],
                    shapes: dict[str, torch.Size]) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass a weight sync through, raising on an unknown, repeated or mis-shaped name, and at the end
    on a missing one: a partial sync would silently mix two policies."""
    seen = set()
    for name, tensor in named_tensors:
        if name not in shapes:
            raise KeyError(f"update_weights: {name!r} is not a parameter of the model")
        if name in seen:
            raise ValueError(f"update_weights: {name!r} was sent twice")
        if tensor.shape != shapes[name]:
            raise ValueError(f"update_weights: {name!r} has shape {list(tensor.shape)}, "
                             f"expected {list(shapes[name])}")
        seen.add(name)
        yield name, tensor
    if missing := shapes.keys() - seen:
        raise ValueError(f"update_weights: {len(missing)} parameters were not sent, e.g. {sorted(missing)[0]!r}")
