"""Build the built-in tool-use task that `torchrun --nproc-per-node 2 train.py --task tools` trains on.

Like the default task (scripts/make_default_model.py, whose tokenizer and model size this reuses),
everything ships in the repo, in minirl/tools_task/, and this script is how it was made (run it
again and you get the same files):

- The task: add two 3-digit numbers that need a carry, "347+285=" -> "632". The tiny model cannot
  learn 3-digit carrying in a short warm-up (minirl/default_task/RECIPE.md, "What did not work"),
  but it has a calculator (minirl/tools_task/calculator.py): it may write a call "[347+285]", the
  environment answers "=632\\n" as an observation, and the policy then writes its answer "632".
- A *reluctant teacher*: it calls the calculator 25% of the time, and otherwise answers at once with
  a sloppy sum (each column without its carry: "347+285=" -> "522"), which is wrong on every one of
  these problems. The model is warmed up to imitate it, on whole episodes with the observation's
  tokens masked out of the loss exactly as RL masks them. So it knows the tool's format and how to
  copy its answer, but mostly does not use it: greedy decoding answers at once (and is wrong),
  sampling calls it about a fifth of the time (21.5%, and is then right). GRPO rewards only right
  answers, so it turns the tool call into the model's first choice.
- train.jsonl (prompts for RL) and test.jsonl (held-out prompts, never seen in warm-up or RL).

    python scripts/make_tools_task.py     # rewrites the model and data in minirl/tools_task/

It takes about 2 minutes of one CPU thread (6 minutes of wall time on a busy 2-core machine).
minirl/tools_task/RECIPE.md says how the RL job does.
"""

import json
import os
import random
import shutil
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minirl.attention import AttnMeta, cu_seqlens_from_positions  # noqa: E402
from minirl.backend import SamplingParams  # noqa: E402
from minirl.episodes import Episode, EpisodeConfig, run_episodes  # noqa: E402
from minirl.generate import Generator  # noqa: E402
from minirl.hf import read_config, save_model  # noqa: E402
from minirl.model import Transformer, init_weights  # noqa: E402
from minirl.tokenizer import Tokenizer  # noqa: E402
from minirl.tools_task.calculator import Calculator  # noqa: E402
from make_default_model import sft  # noqa: E402  (scripts/, next to this file)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(REPO, "minirl", "tools_task")
DEFAULT_TASK = os.path.join(REPO, "minirl", "default_task")  # its tokenizer, and its model size
ENV = "minirl.tools_task.calculator:Calculator"
SEED = 0
N_TEST = 200
N_TRAIN = 4000  # RL prompts kept in the repo (a run of 30 steps x 16 prompts uses 480)
TOOL_RATE = 0.25  # how often the teacher calls the calculator
SFT_STEPS, SFT_BATCH, SFT_LR, SFT_WARMUP, SFT_DECAY = 400, 64, 1e-3, 50, 100
MAX_NEW_TOKENS, MAX_TURNS = 10, 3  # a call "[347+285]" is 9 tokens, an answer "632" and EOS 4


def sloppy_sum(x: int, y: int) -> str:
    """Each column's digit sum without its carry; the leading column written in full."""
    xs, ys = str(x), str(y)
    return str(int(xs[0]) + int(ys[0])) + "".join(str((int(a) + int(b)) % 10) for a, b in zip(xs[1:], ys[1:]))


def split_problems(rng: random.Random) -> tuple[list, list, list]:
    """(warm-up, train, test) lists of (x, y), 100 <= x, y < 500, all needing a carry; test is held out."""
    problems = [(x, y) for x in range(100, 500) for y in range(100, 500) if sloppy_sum(x, y) != str(x + y)]
    rng.shuffle(problems)
    test, rest = problems[:N_TEST], problems[N_TEST:]
    return rest[: len(rest) // 2], rest[len(rest) // 2:][:N_TRAIN], test


def teacher_episode(tok: Tokenizer, rng: random.Random, x: int, y: int) -> tuple[list[int], list[int], list[float]]:
    """(prompt ids, trajectory ids, mask): the policy's turns 1.0, the calculator's answer 0.0."""
    prompt, eos = tok.encode(f"{x}+{y}="), tok.eos_ids[:1]
    if rng.random() >= TOOL_RATE:
        answer = tok.encode(sloppy_sum(x, y)) + eos
        return prompt, answer, [1.0] * len(answer)
    call, obs, answer = tok.encode(f"[{x}+{y}]"), tok.encode(f"={x + y}\n"), tok.encode(str(x + y)) + eos
    return prompt, call + obs + answer, [1.0] * len(call) + [0.0] * len(obs) + [1.0] * len(answer)


def sft_batch(tok: Tokenizer, rng: random.Random, problems: list):
    """SFT_BATCH teacher episodes, packed: (input_ids, position_ids, meta, targets, loss mask), [T] each."""
    ids, positions, targets, mask = [], [], [], []
    for x, y in rng.choices(problems, k=SFT_BATCH):
        prompt, traj, traj_mask = teacher_episode(tok, rng, x, y)
        seq = prompt + traj
        ids += seq
        positions += range(len(seq))
        targets += seq[1:] + [tok.pad_id]
        mask += [0.0] * (len(prompt) - 1) + traj_mask + [0.0]
    position_ids = torch.tensor(positions)
    return (torch.tensor(ids), position_ids, AttnMeta(*cu_seqlens_from_positions(position_ids)),
            torch.tensor(targets), torch.tensor(mask))


def warm_up(model: Transformer, tok: Tokenizer, rng: random.Random, problems: list):
    """Supervised training on the reluctant teacher's episodes (the default task's warm-up loop)."""
    sft(model, lambda: sft_batch(tok, rng, problems), SFT_STEPS, SFT_LR, SFT_WARMUP, SFT_DECAY)


def evaluate(model: Transformer, tok: Tokenizer, problems: list, temperature: float) -> tuple[float, float]:
    """(accuracy, fraction of episodes that called the calculator), episodes played as in RL."""
    gen = Generator(model.cfg, tok.eos_ids, tok.pad_id, dtype=torch.float32, max_batch_size=512)
    gen.update_weights(model.named_parameters())
    episodes = [Episode(i, tok.encode(f"{x}+{y}="), SEED * 1000 + i, Calculator()) for i, (x, y) in enumerate(problems)]
    ec = EpisodeConfig(ENV, Calculator, tok.encode("]")[0], MAX_TURNS, MAX_TURNS * MAX_NEW_TOKENS)
    run_episodes(gen, episodes, [f"{x}+{y}=" for x, y in problems], [str(x + y) for x, y in problems], ec, tok,
                 SamplingParams(MAX_NEW_TOKENS, temperature))
    return (sum(e.reward for e in episodes) / len(episodes),
            sum(0.0 in e.mask for e in episodes) / len(episodes))


def main():
    torch.set_num_threads(1)  # the arithmetic, and so the model, does not depend on the machine's cores
    rng = random.Random(SEED)
    warm_up_problems, train, test = split_problems(rng)
    tok = Tokenizer.from_dir(DEFAULT_TASK)
    cfg = read_config(DEFAULT_TASK)  # the default task's 0.65M-parameter Qwen3 shape, fresh weights
    model = Transformer(cfg)
    init_weights(model, seed=SEED)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; warm-up on a teacher "
          f"who calls the calculator {TOOL_RATE:.0%} of the time", flush=True)
    warm_up(model, tok, rng, warm_up_problems)
    with torch.no_grad():
        greedy, greedy_calls = evaluate(model, tok, test, 0.0)
        sampled, sampled_calls = evaluate(model, tok, test, 1.0)
    print(f"held-out: greedy accuracy {greedy:.1%} (calls the tool in {greedy_calls:.1%}); at temperature 1 "
          f"{sampled:.1%} (calls the tool in {sampled_calls:.1%})")
    if sampled < 0.1:
        raise RuntimeError("the warm-up did not learn to use the calculator; raise SFT_STEPS")

    with tempfile.TemporaryDirectory() as tmp:  # save_model replaces its directory: write apart, copy in
        model_dir = os.path.join(tmp, "model")
        save_model(model_dir, cfg, model.state_dict().items(), tokenizer_dir=DEFAULT_TASK)
        os.makedirs(OUT_DIR, exist_ok=True)
        for name in os.listdir(model_dir):
            shutil.copyfile(os.path.join(model_dir, name), os.path.join(OUT_DIR, name))
    for name, problems in (("train.jsonl", train), ("test.jsonl", test)):
        with open(os.path.join(OUT_DIR, name), "w") as f:
            f.writelines(json.dumps({"prompt": f"{x}+{y}=", "answer": str(x + y)}) + "\n" for x, y in problems)
    print(f"wrote {os.path.normpath(OUT_DIR)}: {len(train)} train and {len(test)} test prompts")


if __name__ == "__main__":
    main()
