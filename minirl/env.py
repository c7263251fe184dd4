"""Environments for multi-turn rollouts: the interface, the loader and the checks around user code.

The policy writes a turn until EOS or the environment's `stop` token (say, the end of a tool call); the
environment answers with an observation (the tool's output, appended to the context), a reward and
whether the episode is over. An environment is a class, named like a reward (`--env module:Name` or
`path/to/file.py:Name`); one instance per episode keeps its state, and the episode's reward is the sum of
its steps'. Every call into it goes through `checked_start` / `checked_step`: an exception, a sys.exit()
or a bad value becomes one ValueError naming the environment and the prompt.
"""

import functools
from typing import NamedTuple, Protocol, runtime_checkable

from minirl.rewards import as_reward, call_user, import_named


class EnvStep(NamedTuple):
    """What an environment returns for one policy turn (a plain 3-tuple works too)."""

    observation: str | None  # appended after the turn, tokenised on its own; None: nothing
    reward: float
    done: bool


@runtime_checkable
class Env(Protocol):
    stop: str  # the text that ends a policy turn besides EOS: exactly one token of the tokenizer

    def start(self, prompt: str, answer: str) -> None:
        """Begin an episode on one dataset row: its prompt (a string, chat messages as JSON) and answer."""

    def step(self, text: str, token_ids: list[int]) -> EnvStep:
        """The policy's turn, as text and as the sampled ids (ending with EOS or the stop id) -> EnvStep."""


@functools.cache
def load_env(spec: str):
    """The environment class named by `spec` (`module:Name` or `file.py:Name`), checked by making one.
    Cached: a .py file is executed once (config.validate and config.derive both look it up)."""
    cls = import_named(spec, "env", "an env is 'module:Name' or 'file.py:Name' (see minirl/env.py)")
    env = call_user(cls, f"env {spec!r}: {spec.rpartition(':')[2]}()")
    if not isinstance(env, Env):
        raise ValueError(f"env {spec!r}: an env needs a `stop` string and `start` and `step` methods (minirl/env.py)")
    if not isinstance(env.stop, str) or not env.stop:
        raise ValueError(f"env {spec!r}: `stop` must be a non-empty string, got {env.stop!r}")
    return cls


def stop_token_id(spec: str, tok) -> int:
    """The id of the env's stop text: it must be one token, so that a turn ends on a sampled id."""
    stop = load_env(spec)().stop
    ids = tok.encode(stop)
    if len(ids) != 1:
        raise ValueError(f"env {spec!r}: stop {stop!r} is {len(ids)} tokens for this tokenizer; it must be one")
    return ids[0]


def checked_start(env: Env, spec: str, prompt_index: int, prompt: str, answer: str):
    """`env.start(prompt, answer)`, or a ValueError naming the env and the prompt."""
    call_user(env.start, f"env {spec!r} on prompt {prompt_index}: start", prompt, answer)


def checked_step(env: Env, spec: str, prompt_index: int, text: str, token_ids: list[int]) -> EnvStep:
    """`env.step(text, token_ids)` as an EnvStep with a float reward, or a ValueError saying what was wrong."""
    where = f"env {spec!r} on prompt {prompt_index}"
    out = call_user(env.step, f"{where}: step", text, list(token_ids))  # a copy: the env cannot edit the ids
    if not isinstance(out, tuple) or len(out) != 3:
        raise ValueError(f"{where}: step returned {out!r}; it must return (observation, reward, done)")
    observation, reward, done = out
    if observation is not None and not isinstance(observation, str):
        raise ValueError(f"{where}: observation {observation!r} ({type(observation).__name__}) is not a string or None")
    if as_reward(reward) is None:
        raise ValueError(f"{where}: reward {reward!r} ({type(reward).__name__}) is not a number finite in float32")
    if not isinstance(done, bool):
        raise ValueError(f"{where}: done {done!r} ({type(done).__name__}) is not a bool")
    return EnvStep(observation, as_reward(reward), done)
