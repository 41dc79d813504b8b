"""How a response is scored: K&K (Logic-RL's reward), math (math-verify), arithmetic. tasks.py calls these.

`response` is always the assistant's whole turn: the task's prefill (e.g. "<think>") followed by
the generated text. No reward ever raises on any string: a response the policy can write is a
response the trainer must survive, and any hole here is a hole the policy will find.

K&K (Logic-RL's reward; docs/algorithm.md, "Tasks and rewards"):
    format  +1 when <think>, </think>, <answer>, </answer> each occur exactly once and in that order, else -1
    answer  +2 every role right, -1.5 any role wrong, -2 unparseable (or format failed)
    total   in {3, -0.5, -1, -3}; "correct" = total 3
Parsing the <answer> block: case, whitespace and markdown emphasis are ignored and names may come in any
order, as a "(1) ..." list or in one sentence. Each name takes the first knight/knave word after it (before
another name). As in Logic-RL, a name without a role, or more role words than people, is unparseable.

Arithmetic (data.py's running sums mod 10, "3 + 5 - 7 =" -> "8 1"): 1.0 when the response is exactly the
scratchpad's n - 1 digits (whitespace between; a decoded end token after them is allowed) and the last digit
is right, else 0.0; "format_ok" = the scratchpad has that shape. Intermediate digits are the model's own.

Math: the LAST \\boxed{...} of the response, checked against the reference with math-verify (no hand-written
LaTeX equivalence): 1.0 equivalent, 0.0 otherwise; "format_ok" = a \\boxed{} answer was found. Answers over
MAX_ANSWER_CHARS score 0 unparsed. math-verify runs in killable worker processes (verifier.py): an answer
still unchecked after MATH_TIMEOUT_S scores 0, so no response can hang the trainer. K&K and arithmetic are
scored in-process (pure Python, linear time).
"""
import re
from functools import lru_cache

import data

# ------------------------------------------------------------------------------- Knights and Knaves (Logic-RL's values)

FORMAT_RIGHT, FORMAT_WRONG = 1.0, -1.0
ANSWER_RIGHT, ANSWER_WRONG, ANSWER_UNPARSED = 2.0, -1.5, -2.0
KK_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_EMPHASIS = re.compile(r"[*_`#]")  # markdown emphasis / headers / code around names and roles

def kk_format_ok(response):
    """Each of the four tags exactly once, in the order <think> </think> <answer> </answer>."""
    positions = [response.find(tag) for tag in KK_TAGS]
    return all(response.count(tag) == 1 for tag in KK_TAGS) and positions == sorted(positions)

_WORD = re.compile(r"\w+")
_ROLES = {"knight": True, "knights": True, "knave": False, "knaves": False}

@lru_cache(maxsize=1024)
def _names_pattern(folded):
    """For names that are not single words ("Mary Ann"): whole names and role words, longest names first."""
    words = sorted(set(folded), key=len, reverse=True)
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r"|knights?|knaves?)\b")

def kk_parse(answer_text, names):
    """Roles (True = knight) in `names` order read from an answer block, or None when unparseable."""
    text = _EMPHASIS.sub("", answer_text).casefold()
    folded = tuple(name.casefold() for name in names)
    known = set(folded)
    if all(_WORD.fullmatch(name) for name in folded):
        words = (m.group(0) for m in _WORD.finditer(text))  # whole words: "Jack" never matches inside "Jackson"
    else:
        words = (m.group(1) for m in _names_pattern(folded).finditer(text))
    roles, current, role_words = {}, None, 0
    for word in words:
        if word in known:
            current = word
        elif word in _ROLES:
            role_words += 1
            if current is not None and current not in roles:
                roles[current] = _ROLES[word]
            current = None
    if role_words != len(names) or len(roles) != len(known):
        return None
    return [roles[name] for name in folded]

def kk_score(response, solution, names):
    """{"reward", "correct", "format_ok"} of a whole assistant turn (Logic-RL's values)."""
    response = _text(response)
    if len(solution) != len(names):
        raise ValueError(f"kk reward: {len(solution)} roles for {len(names)} names; they must match one to one")
    if not kk_format_ok(response):
        return {"reward": FORMAT_WRONG + ANSWER_UNPARSED, "correct": False, "format_ok": False}
    answer = response[response.find("<answer>") + len("<answer>"):response.find("</answer>")]
    roles = kk_parse(answer, names)
    if roles is None:
        points = ANSWER_UNPARSED
    else:
        points = ANSWER_RIGHT if roles == [bool(s) for s in solution] else ANSWER_WRONG
    return {"reward": FORMAT_RIGHT + points, "correct": points == ANSWER_RIGHT, "format_ok": True}

def kk_reward(response, solution, names):
    """Logic-RL's K&K reward of a whole assistant turn: 3, -0.5, -1 or -3."""
    return kk_score(response, solution, names)["reward"]

# --------------------------------------------------------- math: math-verify, in worker processes (verifier.py)

MATH_TIMEOUT_S = 10.0  # hard wall-clock limit per answer; past it the worker is killed and the answer scores 0
MAX_ANSWER_CHARS = 1000  # a boxed answer longer than this is not an answer (no reference comes close)

def _text(response):
    if not isinstance(response, str):
        raise TypeError(f"rewards: response must be a str (the decoded assistant turn), got {type(response).__name__}")
    return response

def math_reward(response, answer, timeout_s=None):
    """1.0 when the last \\boxed{} of the response is equivalent to the reference answer, else 0.0."""
    return math_scores([response], [answer], timeout_s)[0]["reward"]

def math_scores(responses, answers, timeout_s=None):
    """{"reward", "correct", "format_ok"} per (response, reference answer); answers checked in parallel."""
    preds = [data.extract_boxed(_text(r)) for r in responses]
    preds = [None if p is None or len(p) > MAX_ANSWER_CHARS else p for p in preds]
    # Identical strings are equivalent without a worker round trip; the rest go to math-verify.
    verdicts = {i: p.strip() == str(answers[i]).strip() for i, p in enumerate(preds) if p is not None}
    rest = [i for i, ok in verdicts.items() if not ok]
    if rest:
        import verifier  # the worker pool starts only once a math answer needs it
        pairs = [(preds[i], str(answers[i])) for i in rest]
        timeout_s = MATH_TIMEOUT_S if timeout_s is None else timeout_s
        verdicts.update(zip(rest, verifier.start_pool().verify(pairs, timeout_s)))
    return [{"reward": 1.0 if verdicts.get(i) else 0.0, "correct": bool(verdicts.get(i)), "format_ok": p is not None}
            for i, p in enumerate(preds)]

# --------------------------------------------------------------------------- arithmetic (data.py's running sums mod 10)

_END_TOKENS = re.compile(r"(?:\s*(?:<\|[^<>|]{1,40}\|>|</s>|<eos>))+\s*$")  # a decoded end token, if kept

def arith_score(response, answer):
    """{"reward", "correct", "format_ok"}. Format: the scratchpad's n - 1 digits separated by whitespace, nothing
    else (a trailing end token, when the caller decoded it, is allowed). Reward 1: format right, last digit right."""
    reference = answer.split()
    values = _END_TOKENS.sub("", _text(response)).split()
    digits = all(len(v) == 1 and v in "0123456789" for v in values)
    format_ok = bool(reference) and len(values) == len(reference) and digits
    correct = format_ok and values[-1] == reference[-1]
    return {"reward": 1.0 if correct else 0.0, "correct": correct, "format_ok": format_ok}
