"""Multi-turn rollouts: many episodes of policy turns and environment observations, run batched.

The one thing that is easy to get wrong is the token bookkeeping. An episode's trajectory is the
prompt followed by one flat list of token ids, and three parallel lists say what each id is:

    ids       prompt | turn 1 (sampled) | observation 1 | turn 2 (sampled) | ...
    mask               1 1 1 1 1          0 0 0 0         1 1 1 ...
    logprobs           generator's        0.0 (none)      generator's

- A policy turn is kept exactly as sampled: the ids the generator returned, never re-tokenised from
  their text (decode(encode(text)) need not give the same ids, and the trainer must score the ids
  the generator's log-probs belong to).
- An observation is tokenised on its own and appended; its tokens get mask 0 (no loss, and left out
  of every normaliser) and no generator log-prob.
- The trainer then treats the whole trajectory as one sample (`packing.pack` reads the mask).

Each turn, every live episode's context (prompt + trajectory so far) goes to the generator as a
prompt: the generator prefills it again rather than continuing from a cache it kept. That needs no
new generator code (vLLM's prefix cache skips most of the re-prefill anyway), and on the small
contexts of the toy task it costs little (see README, "Multi-turn rollouts with tools"). Finished
episodes drop out of the batch.

Limits (`EpisodeConfig`): at most `max_turns` policy turns, and at most `budget` tokens after the prompt (turns and
observations). An episode ends with finish_reason
    done       the environment said so
    max_turns  the last allowed turn was written and the environment had not ended it
    length     a turn was cut by the budget, or an observation did not fit in it
A turn cut by max_new_tokens (the per-turn limit) is handed to the environment like any other.
"""

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from minirl.backend import RolloutBackend, SamplingParams, sample_seed
from minirl.env import Env, checked_start, checked_step


@dataclass(frozen=True)
class EpisodeConfig:
    """The environment and the limits of an episode, resolved once before the first step."""

    spec: str  # --env, as errors name it
    make_env: Callable[[], Env]  # one instance per episode
    stop_id: int  # the env's stop text: one token id that ends a policy turn
    max_turns: int
    budget: int  # tokens after the prompt, turns and observations


@dataclass
class Episode:
    prompt_index: int
    prompt_ids: list[int]
    seed: int  # the episode's own stream; turn t samples from sample_seed(seed, 0, t, 0)
    env: Env
    ids: list[int] = field(default_factory=list)  # every token after the prompt
    logprobs: list[float] = field(default_factory=list)  # generator log-prob of each; 0.0 for observations
    mask: list[float] = field(default_factory=list)  # 1.0 policy token, 0.0 observation token
    reward: float = 0.0  # sum of the environment's rewards
    turns: int = 0  # policy turns written
    finish_reason: str = ""  # "" while running, then done | max_turns | length


def run_episodes(generator: RolloutBackend, episodes: list[Episode], prompts: list[str], answers: list[str],
                 ec: EpisodeConfig, tok, params: SamplingParams, progress=None, stop=None):
    """Play every episode to its end, in place. `params.max_new_tokens` bounds each turn, `ec.budget`
    the whole trajectory. An environment error is a ValueError naming it and the prompt; the episodes
    stop where they are, as they do when `stop()` turns true (a signal, read between turns)."""
    for e, prompt, answer in zip(episodes, prompts, answers):
        checked_start(e.env, ec.spec, e.prompt_index, prompt, answer)
    for turn in range(ec.max_turns):
        live = [e for e in episodes if not e.finish_reason]
        if not live or (stop is not None and stop()):
            break
        left = [ec.budget - len(e.ids) for e in live]  # >= 1: an episode with none left has finished
        turn_params = replace(params, max_new_tokens=min(params.max_new_tokens, max(left)),
                              stop_token_ids=(*params.stop_token_ids, ec.stop_id))
        outs = generator.generate([e.prompt_ids + e.ids for e in live], turn_params,
                                  seeds=[sample_seed(e.seed, 0, turn, 0) for e in live], stop=stop)
        for e, out, n_left in zip(live, outs, left):
            ids, logprobs = out.token_ids[:n_left], out.logprobs[:n_left]  # the batch's limit may exceed its own
            e.ids += ids
            e.logprobs += logprobs
            e.mask += [1.0] * len(ids)
            e.turns += 1
            if len(ids) < len(out.token_ids) or (out.finish_reason != "stop" and len(e.ids) == ec.budget):
                e.finish_reason = "length"  # a turn the budget cut is not handed to the environment
            else:  # ended by EOS, the stop id or max_new_tokens: the environment reads it
                play(e, ec, tok, ids)
            if not e.finish_reason and e.turns == ec.max_turns:
                e.finish_reason = "max_turns"
            if e.finish_reason and progress is not None:
                progress.update(1)


def play(e: Episode, ec: EpisodeConfig, tok, turn_ids: list[int]):
    """Hand a finished turn to the environment; append its observation, or end the episode."""
    step = checked_step(e.env, ec.spec, e.prompt_index, tok.decode(turn_ids), turn_ids)
    e.reward += step.reward
    if step.done:
        e.finish_reason = "done"
        return
    obs = tok.encode(step.observation) if step.observation else []
    if len(e.ids) + len(obs) >= ec.budget:  # no room for the observation and a next turn
        e.finish_reason = "length"
        return
    e.ids += obs
    e.logprobs += [0.0] * len(obs)
    e.mask += [0.0] * len(obs)
