"""The toy tool-use task's environment: a calculator the policy calls as `[347+285]`.

An episode on the prompt "347+285=":
    policy turn   [347+285]        a call: ends with the stop token "]"
    observation   =632\\n           the calculator's answer (no loss on these tokens)
    policy turn   632<eos>         the answer: the episode ends, reward 1 if it is right
A turn that ends with EOS (or that is not a call) is the answer. Calls are free; only the final
answer is rewarded. `train.py --config minirl/tools_task/train_config.json` trains on it.
"""

import re

from minirl.env import EnvStep

CALL = re.compile(r"\[(\d{1,6}(?:[+*-]\d{1,6}){0,3})\]$")  # a few small integers, + - * left to right


def calculate(expr: str) -> int:
    """Evaluate `expr` ("12+3*4") strictly left to right, as a pocket calculator does: 60."""
    tokens = re.findall(r"\d+|[+*-]", expr)
    value = int(tokens[0])
    for op, num in zip(tokens[1::2], tokens[2::2]):
        value = value + int(num) if op == "+" else value - int(num) if op == "-" else value * int(num)
    return value


class Calculator:
    stop = "]"

    def start(self, prompt: str, answer: str) -> None:
        self.answer = answer

    def step(self, text: str, token_ids: list[int]) -> EnvStep:
        if m := CALL.search(text):
            return EnvStep(f"={calculate(m[1])}\n", 0.0, False)
        if text.endswith("]"):  # a malformed call
            return EnvStep("=error\n", 0.0, False)
        return EnvStep(None, float(text.strip() == self.answer), True)
