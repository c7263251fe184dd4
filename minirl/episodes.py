"""Multi-turn rollouts: many episodes of policy turns and environment observations, run batched.

The one thing that is easy to get wrong is the token bookkeeping. An episode's trajectory is the
prompt followed by one flat list of token ids, and three parallel lists say what each id is:

    ids       prompt | turn 1 (sampled) | observation 1 | turn 2 (sampled) | ...
    mask               1 1 1 1 1          0 0 0 0         1 1 1 ...
    logprobs           generator's        0.0 (none)      generator's

A policy turn keeps exactly the ids the generator sampled, never re-tokenised from its text (the trainer
must score the ids the log-probs belong to); an observation is tokenised on its own, with mask 0 (no
loss, in no normaliser). The trainer packs the trajectory as one sample (`packing.pack`).
All first turns go to the generator in one call; as a turn finishes, the environment reads it and the
episode's next turn (prompt + trajectory so far, prefilled again) joins the generator's queue as a new
request (`follow_up`) while other episodes decode. Turn t samples from the episode's own seed: the
trajectories do not depend on the batching. An episode ends with finish_reason `done` (the environment
said so), `max_turns`, or `length` (the token budget cut a turn or left no room for an observation).
"""

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from minirl.backend import Completion, RolloutBackend, SamplingParams, sample_seed
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
    """Play every episode to its end, in place. `params.max_new_tokens` bounds each turn, `ec.budget` the
    whole trajectory. An environment error is a ValueError naming it and the prompt; the episodes stop
    where they are, as they do when `stop()` turns true (a signal, read whenever the generator looks)."""
    for e, prompt, answer in zip(episodes, prompts, answers):
        checked_start(e.env, ec.spec, e.prompt_index, prompt, answer)
    turn_params = replace(params, stop_token_ids=(*params.stop_token_ids, ec.stop_id))
    owner = list(episodes)  # the episode of each generator request: first turns, then follow-ups in order

    def request(e: Episode) -> tuple[list[int], int, int]:
        """Its next turn: (context so far, the turn's seed, the tokens it may write)."""
        left = ec.budget - len(e.ids)  # >= 1: an episode with none left has finished
        return e.prompt_ids + e.ids, sample_seed(e.seed, 0, e.turns, 0), min(params.max_new_tokens, left)

    def follow_up(i: int, out: Completion):
        e = owner[i]
        e.ids += out.token_ids
        e.logprobs += out.logprobs
        e.mask += [1.0] * len(out.token_ids)
        e.turns += 1
        if out.finish_reason != "stop" and len(e.ids) == ec.budget:
            e.finish_reason = "length"  # a turn the budget cut is not handed to the environment
        else:  # ended by EOS, the stop id or max_new_tokens: the environment reads it
            play(e, ec, tok, out.token_ids)
        if not e.finish_reason and e.turns == ec.max_turns:
            e.finish_reason = "max_turns"
        if e.finish_reason:
            if progress is not None:
                progress.update(1)
            return None
        owner.append(e)
        return request(e)

    if not episodes:
        return
    first = [request(e) for e in episodes]
    longest = max(len(e.prompt_ids) for e in episodes) + ec.budget  # a context never outgrows its prompt + budget
    generator.generate([r[0] for r in first], turn_params, seeds=[r[1] for r in first], limits=[r[2] for r in first],
                       stop=stop, follow_up=follow_up, max_context=longest)


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
