"""The built-in corpus: multi-digit arithmetic, every number written least-significant digit first.

The smoke job needs data on which a 2-layer, dim-128 transformer makes measurable progress,
so that "the loss fell and held-out accuracy beat chance" checks the training stack rather
than the model's size. Every number is zero-padded and written backwards:

    "21+93=150"    is  12 + 39 = 051
    "07-80=26"     is  70 - 08 = 62
    "21*93=8640"   is  12 * 39 = 0468

* Fixed widths (operands n_digits; answers n+1 for +, n for -, 2n for *) give every
  problem of one operator the same shape.
* Writing the answer least-significant first is the order carries are computed in, so
  each digit depends on operand digits and on digits already written (Lee et al. 2023,
  "Teaching Arithmetic to Small Transformers": reversed outputs need far fewer examples).
* Reversing the operands as well puts answer digit i and the operand digits it sums at
  the same relative distance for every i (for +: 2n+1 and n tokens back), so one pair of
  relative-position attention heads can serve all digits.
* What a tiny model learns first is the format and the carry-out digit; the mod-10 digit
  sums need sharp attention to exactly two tokens and come later (hundreds of steps).
* Subtraction draws a >= b so answers stay non-negative and need no sign.

Each problem is one document; the loader ends documents with EOS, so a held-out prompt is
fed after an EOS, the left context problems have in training.

Chain of thought (`data.cot`): a share of the training problems is written in R1's output
format, "<think>" working "</think><answer>" answer "</answer>" (DeepSeek-R1 Table 1), so
that a base model pretrained here already emits the tags that R1-Zero's format and accuracy
rewards read (rl/rewards.py). The working goes digit by digit in the corpus's order, least
significant first, one step per operand digit, steps separated by a space:

    +  "a+b+c=dk"   operand digits a, b, carry in c; d = (a+b+c) mod 10, carry out k
    -  "a-b-c=dk"   borrow in c; d = (a-b-c) mod 10, borrow out k
    *  "A*b=P"      operand A (backwards) times digit j of b, shifted by j places, written
                    backwards over the answer's width; the answer is the sum of the P

    "21+93="  ->  "<think>2+9+0=11 1+3+1=50</think><answer>150</answer>"
    "07-80="  ->  "<think>0-8-0=21 7-0-1=60</think><answer>26</answer>"
    "21*93="  ->  "<think>21*9=8010 21*3=0630</think><answer>8640</answer>"

For + and - the answer's digits are the steps' d (and, for +, the last carry): each step
needs only the two operand digits it copies and the carry just written.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

OPS = "+-*"


def answer_width(op: str, n_digits: int) -> int:
    return {"+": n_digits + 1, "-": n_digits, "*": 2 * n_digits}[op]


def _backwards(value: int, width: int) -> str:
    return str(value).zfill(width)[::-1]


def format_problem(a: int, op: str, b: int, n_digits: int) -> tuple[str, str]:
    """(prompt, answer) strings: ("21+93=", "150") for 12 + 39."""
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    if value < 0:
        raise ValueError(f"{a}{op}{b} is negative; subtraction problems need a >= b")
    answer = _backwards(value, answer_width(op, n_digits))
    return f"{_backwards(a, n_digits)}{op}{_backwards(b, n_digits)}=", answer


def _digit(value: int, i: int) -> int:
    return value // 10**i % 10


def _cot_steps(a: int, op: str, b: int, n_digits: int) -> list[str]:
    if op == "*":
        return [f"{_backwards(a, n_digits)}*{_digit(b, j)}={_backwards(a * _digit(b, j) * 10**j, 2 * n_digits)}"
                for j in range(n_digits)]
    steps, carry = [], 0
    for i in range(n_digits):
        x, y = _digit(a, i), _digit(b, i)
        total = x + y + carry if op == "+" else x - y - carry
        carry_out = int(not 0 <= total < 10)  # + carries at 10 or more, - borrows below 0
        steps.append(f"{x}{op}{y}{op}{carry}={total % 10}{carry_out}")
        carry = carry_out
    return steps


def format_cot(a: int, op: str, b: int, n_digits: int) -> tuple[str, str]:
    """(prompt, completion) of the chain-of-thought writing (module docstring): the prompt is
    format_problem's, the completion "<think>..</think><answer>" + its answer + "</answer>"."""
    prompt, answer = format_problem(a, op, b, n_digits)
    return prompt, f"<think>{' '.join(_cot_steps(a, op, b, n_digits))}</think><answer>{answer}</answer>"


ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def stated_answer(completion: str) -> str:
    """The answer a completion states: the text of its last <answer>...</answer> (R1's
    format), else the completion itself, stripped."""
    tagged = ANSWER_TAG.findall(completion)
    return (tagged[-1] if tagged else completion).strip()


def completion_chars(op: str, n_digits: int, cot: bool) -> int:
    """Characters of a problem's completion: its answer, or its whole chain-of-thought
    writing (fixed width for each operator)."""
    return len(format_cot(0, op, 0, n_digits)[1]) if cot else answer_width(op, n_digits)


def read_number(text: str) -> int:
    """The integer a backwards digit string stands for: read_number("150") == 51."""
    return int(text[::-1])


def check_ops(ops: str) -> str:
    """`data.ops` with duplicates dropped (they would silently reweight the mix)."""
    bad = sorted(set(ops) - set(OPS))
    if not ops or bad:
        raise ValueError(f"data.ops={ops!r} must be a non-empty string of operators from {OPS!r}, e.g. data.ops='+-'")
    return "".join(dict.fromkeys(ops))


def _space_size(op: str, n_digits: int) -> int:
    n = 10**n_digits
    return n * (n + 1) // 2 if op == "-" else n * n


def problem_space(n_digits: int, ops: str) -> int:
    """Distinct problems of the corpus (subtraction counts each a >= b pair once)."""
    return sum(_space_size(op, n_digits) for op in check_ops(ops))


def problem_chars(op: str, n_digits: int) -> int:
    """Length of one problem's text, "21+93=150": two operands, the operator, '=', the answer."""
    return 2 * n_digits + 2 + answer_width(op, n_digits)


def check_split(n_digits: int, ops: str, n_train: int, n_eval: int) -> str:
    """The data.* rules of the corpus (config/validate.py runs them before any process
    starts); returns the operators as `check_ops` does."""
    ops = check_ops(ops)
    if n_digits < 1:
        raise ValueError(f"data.n_digits={n_digits} must be >= 1")
    if n_train < 1:
        raise ValueError(f"data.n_train={n_train} must be >= 1: the training split needs problems")
    space = problem_space(n_digits, ops)
    if not 0 <= n_eval < space:
        raise ValueError(f"data.n_eval={n_eval} must lie in [0, {space - 1}]: data.n_digits={n_digits} with "
                         f"data.ops={ops!r} has {space} distinct problems and training needs some of them")
    return ops


def check_cot(cot: float) -> None:
    if not 0.0 <= cot <= 1.0:
        raise ValueError(f"data.cot={cot} must lie in [0, 1]: the share of training problems written with R1 tags")


def _draw(rng: random.Random, ops: str, n_digits: int) -> tuple[int, str, int]:
    n = 10**n_digits
    op, a, b = rng.choice(ops), rng.randrange(n), rng.randrange(n)
    if op == "-" and a < b:
        a, b = b, a
    return a, op, b


@dataclass(frozen=True)
class ArithmeticCorpus:
    n_digits: int
    ops: str
    train: list[str] = field(repr=False)  # full problem texts, "21+93=150" or its chain-of-thought writing
    heldout: list[tuple[str, str]] = field(repr=False)  # (prompt, answer), disjoint from train


def build_corpus(n_digits: int, ops: str, n_train: int, n_eval: int, seed: int, cot: float = 0.0) -> ArithmeticCorpus:
    """Draw the held-out problems first, then training problems from everything else.

    Training problems may repeat (2-digit addition has only 10^4 distinct problems and the
    default draws 20000); held-out problems are distinct and never appear in training.
    round(cot * n_train) training problems, picked by a stream of their own, are written in
    the chain-of-thought format: the problems themselves do not depend on `cot`.
    """
    ops = check_split(n_digits, ops, n_train, n_eval)
    check_cot(cot)
    # A string seed keeps this stream independent of any other use of the run seed.
    rng = random.Random(f"ds_parallel.arithmetic.{seed}")
    heldout: dict[tuple[int, str, int], None] = {}
    while len(heldout) < n_eval:
        heldout[_draw(rng, ops, n_digits)] = None
    problems = []
    while len(problems) < n_train:
        problem = _draw(rng, ops, n_digits)
        if problem not in heldout:
            problems.append(problem)
    with_cot = set(random.Random(f"ds_parallel.arithmetic.cot.{seed}").sample(range(n_train), round(cot * n_train)))
    train = ["".join((format_cot if i in with_cot else format_problem)(*p, n_digits)) for i, p in enumerate(problems)]
    return ArithmeticCorpus(
        n_digits=n_digits,
        ops=ops,
        train=train,
        heldout=[format_problem(*p, n_digits) for p in heldout],
    )


def chance_accuracy(n_digits: int, ops: str) -> float:
    """Exact-match accuracy of the best guesser that sees the operator but not the operands.

    It always answers the most frequent result for the operator, so this is what a model
    scores once it has learned the format and the answer distribution but no arithmetic.
    With N = 10^n_digits equally likely operands a, b (for -, the pair is swapped to a >= b):
      +  the sum N-1 has N of the N^2 pairs                  -> 1/N
      -  the difference 1 has 2(N-1) of them (swaps double)   -> 2(N-1)/N^2
      *  the product 0 has 2N-1 of them                       -> (2N-1)/N^2
    Operators are drawn uniformly, so the chance level is the mean over operators.
    A uniformly random digit string of the right width would score far less (10^-width).
    """
    ops = check_ops(ops)
    n = 10**n_digits
    best = {"+": 1 / n, "-": 2 * (n - 1) / n**2, "*": (2 * n - 1) / n**2}
    return sum(best[op] for op in ops) / len(ops)
