"""Build the built-in default task that a bare `torchrun --nproc-per-node 2 train.py` trains on.

The default job has to show RL learning on two CPU cores, with nothing downloaded, in ten minutes.
So the model and its data ship in the repo, in minirl/default_task/, and this script is how they
were made (run it again and you get the same files):

- The task: add two 2-digit numbers, "47+85=" -> "132". An answer is right or wrong, so the reward
  is an exact match and needs no learned judge.
- A tokenizer with one token per character, built with the `tokenizers` library.
- A tiny Qwen3 model (3 layers, width 128, 0.65M parameters), trained from scratch to imitate a
  *sloppy teacher* who forgets to carry most of the time: "47+85=" -> "122" (4+8 and 7+5, each
  column written down without its carry). From the teacher's right answers the model learns to
  carry; from the wrong ones it learns to prefer not to. Greedy decoding then mostly gives the
  sloppy answer, while sampling at temperature 1 often finds the right one. That gap between "can"
  and "does" is what GRPO turns into accuracy: the verifier rewards the carried answers, and
  within some tens of steps they become the model's first choice.
- train.jsonl (prompts for RL) and test.jsonl (held-out prompts, never seen in warm-up or RL).
  Both hold only problems that need a carry: on the others the sloppy answer is right, and they
  would only dilute the signal and the accuracy numbers.

    python scripts/make_default_model.py     # rewrites the model and data in minirl/default_task/

It takes about 2.5 minutes on one CPU thread. RECIPE.md in that folder says how the RL job does.
"""

import json
import os
import random
import shutil
import tempfile
import time

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from minirl.attention import AttnMeta, cu_seqlens_from_positions
from minirl.generate import SamplingParams, generate
from minirl.hf import save_model
from minirl.model import ModelConfig, Transformer, init_weights
from minirl.tokenizer import Tokenizer as MiniTokenizer

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "minirl", "default_task")
EOS, UNK = "<|endoftext|>", "<|unk|>"
SEED = 0
N_TEST = 500  # held-out prompts; every other problem that needs a carry goes to train.jsonl
TEACHER_RIGHT = 0.4  # how often the sloppy teacher carries
SFT_STEPS, SFT_BATCH, SFT_LR = 1000, 128, 1e-3
SFT_WARMUP, SFT_DECAY = 50, 300  # steps of linear warm-up at the start, linear decay to 0 at the end
MAX_NEW_TOKENS = 8  # answers have at most 3 digits, plus EOS


def sloppy_sum(x: int, y: int) -> str:
    """The sum of two 2-digit numbers without carrying: the units column mod 10, the tens column
    written in full (47+85 -> "12" "2" = "122")."""
    return str(x // 10 + y // 10) + str((x + y) % 10)


def needs_carry(x: int, y: int) -> bool:
    return sloppy_sum(x, y) != str(x + y)


def prompt_of(x: int, y: int) -> str:
    return f"{x}+{y}="


def split_problems(rng: random.Random) -> tuple[list, list, list]:
    """All 8100 problems, shuffled, as (warm-up, train, test) lists of (x, y).

    test: N_TEST problems that need a carry. train: every other problem that needs a carry.
    warm-up: everything but test, so the held-out problems are never seen before evaluation.
    """
    problems = [(x, y) for x in range(10, 100) for y in range(10, 100)]
    rng.shuffle(problems)
    carry = [p for p in problems if needs_carry(*p)]
    test = carry[:N_TEST]
    held_out = set(test)
    return [p for p in problems if p not in held_out], carry[N_TEST:], test


def build_tokenizer(out_dir: str):
    """One token per printable ASCII character (and newline), plus EOS, which also pads.

    Single characters keep the vocabulary tiny and make every digit a separate decision, which
    is where the model's carry mistakes (and RL's fixes) happen.
    """
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate([EOS, UNK, *chars])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # each character alone
    tok.decoder = decoders.Fuse()  # join tokens back without spaces between them
    tok.add_special_tokens([EOS, UNK])
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "pad_token": EOS,
              "unk_token": UNK, "model_max_length": 64}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": vocab[EOS], "pad_token_id": vocab[EOS]}, f, indent=2)


def model_config(vocab_size: int) -> ModelConfig:
    # qk_norm=True is what makes it Qwen3 (from_hf sets it from model_type; here we say it ourselves).
    return ModelConfig(model_type="qwen3", vocab_size=vocab_size, hidden_size=128, intermediate_size=384,
                       num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, head_dim=32,
                       qk_norm=True, tie_word_embeddings=True, max_position_embeddings=64)


def sft_batch(tok: MiniTokenizer, rng: random.Random, problems: list):
    """SFT_BATCH teacher demonstrations, packed: (input_ids [T], position_ids [T], meta, targets [T],
    loss mask [T]). Only the answer tokens (and the EOS after them) are trained on."""
    ids, positions, targets, mask = [], [], [], []
    for x, y in rng.choices(problems, k=SFT_BATCH):
        answer = str(x + y) if rng.random() < TEACHER_RIGHT else sloppy_sum(x, y)
        prompt, completion = tok.encode(prompt_of(x, y)), tok.encode(answer) + tok.eos_ids[:1]
        seq = prompt + completion
        ids += seq
        positions += range(len(seq))
        targets += seq[1:] + [tok.pad_id]  # token t predicts token t + 1; the last predicts nothing
        mask += [0.0] * (len(prompt) - 1) + [1.0] * len(completion) + [0.0]
    position_ids = torch.tensor(positions)
    cu_seqlens, max_seqlen = cu_seqlens_from_positions(position_ids)
    return (torch.tensor(ids), position_ids, AttnMeta(cu_seqlens, max_seqlen),
            torch.tensor(targets), torch.tensor(mask))


def sft(model: Transformer, next_batch, steps: int, lr: float, warmup: int, decay: int):
    """Supervised warm-up, shared with scripts/make_tools_task.py: `steps` AdamW steps on the masked
    mean negative log-likelihood of `next_batch()` (input_ids, position_ids, meta, targets, loss mask;
    [T] each), gradients clipped to norm 1; the learning rate rises linearly over the first `warmup`
    steps, stays at `lr`, and falls linearly to zero over the last `decay` steps. Prints the loss
    every 100 steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)

    def lr_factor(step):
        return min(1.0, (step + 1) / warmup, (steps - step) / decay)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    t0 = time.time()
    for step in range(1, steps + 1):
        input_ids, position_ids, meta, targets, mask = next_batch()
        logprobs, _ = model(input_ids, position_ids, meta, targets=targets)  # [T]
        loss = -(logprobs * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0:
            print(f"warm-up step {step}/{steps}: loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)


def warm_up(model: Transformer, tok: MiniTokenizer, rng: random.Random, problems: list):
    """Supervised training on the sloppy teacher, at a constant learning rate decayed to zero at the end.

    Carrying is learned in a sudden jump after a plateau of a few hundred steps (in our runs, a
    higher learning rate, or one that already decays, made the plateau longer). After the jump, the model's odds
    of carrying on a given problem wander around the teacher's 40:60 from one batch to the next,
    and with them whether greedy decoding carries; the final decay lets them settle, so the
    warmed-up model reliably prefers the sloppy answer.
    """
    sft(model, lambda: sft_batch(tok, rng, problems), SFT_STEPS, SFT_LR, SFT_WARMUP, SFT_DECAY)


def accuracy(model, tok, problems, temperature=0.0, samples=1) -> tuple[float, float]:
    """(mean accuracy over all samples, fraction of problems solved by at least one sample)."""
    prompts = [tok.encode(prompt_of(x, y)) for x, y in problems for _ in range(samples)]
    params = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=temperature, seed=SEED)
    outs = generate(model, prompts, params, tok.eos_ids, tok.pad_id, max_batch_size=512)
    answers = [str(x + y) for x, y in problems for _ in range(samples)]
    right = torch.tensor([tok.decode(o.token_ids) == a for o, a in zip(outs, answers)], dtype=torch.float)
    right = right.view(len(problems), samples)  # [problems, samples]
    return right.mean().item(), right.amax(1).mean().item()


def main():
    # One thread: the arithmetic, and so the resulting model, does not depend on the machine's cores.
    torch.set_num_threads(1)
    rng = random.Random(SEED)
    warm_up_problems, train, test = split_problems(rng)

    with tempfile.TemporaryDirectory() as tmp:
        tok_dir, model_dir = os.path.join(tmp, "tokenizer"), os.path.join(tmp, "model")
        os.makedirs(tok_dir)
        build_tokenizer(tok_dir)
        tok = MiniTokenizer.from_dir(tok_dir)
        cfg = model_config(tok.vocab_size)
        model = Transformer(cfg)
        init_weights(model, seed=SEED)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"model: {n_params / 1e6:.2f}M parameters; warm-up on a teacher who carries "
              f"{TEACHER_RIGHT:.0%} of the time", flush=True)
        warm_up(model, tok, rng, warm_up_problems)

        greedy, _ = accuracy(model, tok, test)
        sampled, pass8 = accuracy(model, tok, test, temperature=1.0, samples=8)
        print(f"held-out accuracy: greedy {greedy:.1%}; at temperature 1: {sampled:.1%} per sample, "
              f"{pass8:.1%} with any of 8 samples (pass@8)")
        if pass8 < 0.5:
            raise RuntimeError("the warm-up did not learn to carry (pass@8 < 50%); raise SFT_STEPS")

        # save_model replaces its whole directory, so write the model apart and copy its files in.
        save_model(model_dir, cfg, model.state_dict().items(), tokenizer_dir=tok_dir)
        os.makedirs(OUT_DIR, exist_ok=True)
        for name in os.listdir(model_dir):
            shutil.copyfile(os.path.join(model_dir, name), os.path.join(OUT_DIR, name))

    for name, problems in (("train.jsonl", train), ("test.jsonl", test)):
        with open(os.path.join(OUT_DIR, name), "w") as f:
            for x, y in problems:
                f.write(json.dumps({"prompt": prompt_of(x, y), "answer": str(x + y)}) + "\n")
    print(f"wrote {os.path.normpath(OUT_DIR)}: {len(train)} train and {len(test)} test prompts")


if __name__ == "__main__":
    main()
