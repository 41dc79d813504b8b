"""rewards.py: Logic-RL's K&K values on a table of responses, math-verify equivalence on a table of answer
pairs, pathological answers inside the time limit, batch order, and fuzzing that no string raises.

One math-verify worker pool for the whole module (starting workers costs about a second each)."""
import time

import pytest
from hypothesis import given, settings, strategies as st

import data
import rewards
import tasks
import verifier


def score(example, response):
    """One response through its task's scorer (interface change: rewards.score / score_batch became the tasks'
    scorers, tasks.load(name).score, the same interface a task of your own has)."""
    return tasks.load(example["task"]).score([example], [response])[0]

NAMES = ["Jack", "Jackson", "Zoë", "Mia"]  # a prefix pair and a non-ASCII name on purpose
SOLUTION = [True, False, False, True]
RIGHT = "(1) Jack is a knight\n(2) Jackson is a knave\n(3) Zoë is a knave\n(4) Mia is a knight"
VALUES = {3.0, -0.5, -1.0, -3.0}


@pytest.fixture(scope="module", autouse=True)
def pool():
    pool = verifier.start_pool(2)
    yield pool
    verifier.close_pool()


def turn(answer, think="Let me check each statement."):
    return f"<think>{think}</think>\n<answer>{answer}</answer>"


KK_TABLE = [
    ("correct", turn(RIGHT), 3.0),
    ("correct, spaces and newlines around tags", f"<think>\n\nx\n</think>\n\n<answer>\n{RIGHT}\n</answer>\n", 3.0),
    ("one role wrong", turn(RIGHT.replace("Mia is a knight", "Mia is a knave")), -0.5),
    ("all roles wrong", turn("Jack is a knave, Jackson is a knight, Zoë is a knight, Mia is a knave"), -0.5),
    ("a person missing", turn("(1) Jack is a knight\n(2) Jackson is a knave\n(3) Zoë is a knave"), -1.0),
    ("more roles than people", turn(RIGHT + "\n(5) Mia is a knave"), -1.0),
    ("hedging: both roles", turn(RIGHT.replace("Mia is a knight", "Mia is a knight or a knave")), -1.0),
    ("a role before any name", turn("knight: " + RIGHT.replace("(1) Jack is a knight\n", "Jack\n")), -1.0),
    ("empty answer block", turn(""), -1.0),
    ("think tag twice", "<think>a<think>b</think><answer>" + RIGHT + "</answer>", -3.0),
    ("answer tag twice", turn(RIGHT) + "<answer>" + RIGHT + "</answer>", -3.0),
    ("closing tag twice", turn(RIGHT) + "</think>", -3.0),
    ("answer before think", f"<answer>{RIGHT}</answer><think>x</think>", -3.0),
    ("closing before opening", f"</think>x<think><answer>{RIGHT}</answer>", -3.0),
    ("no tags", RIGHT, -3.0),
    ("no answer tags", f"<think>x</think>{RIGHT}", -3.0),
    ("empty", "", -3.0),
    ("very long reasoning", turn(RIGHT, think="Suppose Jack is a knave. " * 20000), 3.0),
    ("very long wrong answer", turn(RIGHT + " knight" * 50000), -1.0),
    ("unicode reasoning", turn(RIGHT, think="假设 Jack 是骑士 🤔 ∀x∈S → ¬x, naïve café"), 3.0),
    ("unicode in the answer", turn(RIGHT.replace("\n", " ✓\n")), 3.0),
    ("fullwidth tags are not tags", f"＜think＞x＜/think＞<answer>{RIGHT}</answer>", -3.0),
    ("markdown emphasis",
     turn("**Jack** is a **knight**\n*Jackson* is a _knave_\n__Zoë__ is a `knave`\n### Mia is a knight"), 3.0),
    ("names in another order", turn("Mia is a knight\nZoë is a knave\nJack is a knight\nJackson is a knave"), 3.0),
    ("one sentence", turn("Jack is a knight, Jackson is a knave, Zoë is a knave, and Mia is a knight."), 3.0),
    ("case and whitespace",
     turn("  (1)   JACK   IS A KNIGHT\n\n(2) jackson is a Knave (3) ZOË is a KNAVE (4) mia:  knight "), 3.0),
    ("colon style", turn("Jack: knight; Jackson: knave; Zoë: knave; Mia: knight"), 3.0),
    # Logic-RL reads "not a knave" as the role word it names: answers must state roles plainly.
    ("negation is not read", turn(RIGHT.replace("Mia is a knight", "Mia is not a knave")), -0.5),
    ("a name never mentioned", turn(RIGHT.replace("Zoë", "Zoe")), -1.0),
]


@pytest.mark.parametrize("case,response,expected", KK_TABLE, ids=[c[0] for c in KK_TABLE])
def test_kk_reward_table(case, response, expected):
    assert rewards.kk_reward(response, SOLUTION, NAMES) == expected
    result = score({"task": "kk", "solution": SOLUTION, "names": NAMES}, response)
    assert result == {"reward": expected, "correct": expected == 3.0, "format_ok": expected != -3.0}


def test_kk_reward_on_prompted_puzzle(tiny_tokenizer):
    # The prefill goes back in front of the generated text: the public answer format then scores 3.
    example = data.kk_examples(people=[5], per_level=1, split="eval")[0]
    _, prefill = tasks.prompt_ids(tasks.load("kk"), example, tiny_tokenizer)
    generated = f" reasoning...</think>\n<answer>\n{example['answer']}\n</answer>"
    assert score(example, prefill + generated)["reward"] == 3.0
    assert score(example, generated)["reward"] == -3.0  # without the prefill the format is wrong


def test_kk_reward_names_of_several_words():
    names, solution = ["Mary Ann", "Jean-Luc", "Ann"], [True, False, True]
    right = "<think>x</think><answer>Mary Ann is a knight, Jean-Luc is a knave, Ann is a knight</answer>"
    assert rewards.kk_reward(right, solution, names) == 3.0
    assert rewards.kk_reward(right.replace("Mary Ann", "Mary"), solution, names) == -1.0  # "Ann" took two roles


def test_kk_reward_rejects_mismatched_solution():
    with pytest.raises(ValueError, match="one to one"):
        rewards.kk_reward(turn(RIGHT), [True], NAMES)
    with pytest.raises(TypeError, match="must be a str"):
        rewards.kk_reward(None, SOLUTION, NAMES)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_kk_reward_never_raises_on_any_text(text):
    assert rewards.kk_reward(text, SOLUTION, NAMES) in VALUES


FRAGMENTS = ["<think>", "</think>", "<answer>", "</answer>", "Jack", "Jackson", "Zoë", "Mia", " is a ", "knight",
             "knave", "knights", "**", "(1) ", "\n", " ", "not", ",", "\\boxed{", "}", "{"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=3), max_size=40))
def test_kk_reward_never_raises_on_tag_soup(parts):
    response = "".join(parts)
    assert rewards.kk_reward(response, SOLUTION, NAMES) in VALUES


ARITH_TABLE = [  # reference "8 1" (from "3 + 5 - 7 =")
    ("8 1", 1.0, True),
    (" 8 1", 1.0, True),
    ("8 1\n", 1.0, True),
    ("8 1<|im_end|>", 1.0, True),
    ("8  1 <|endoftext|><|endoftext|>", 1.0, True),
    ("7 1", 1.0, True),  # only the last value is paid; the scratchpad is the model's own
    ("8 2", 0.0, True),
    ("1", 0.0, False),  # no scratchpad
    ("8 1 1", 0.0, False),
    ("81", 0.0, False),
    ("8,1", 0.0, False),
    ("8 1 =", 0.0, False),
    ("8 ١", 0.0, False),  # an Arabic-Indic digit is not a digit here
    ("<|im_end|>", 0.0, False),
    ("", 0.0, False),
]


@pytest.mark.parametrize("response,expected,format_ok", ARITH_TABLE, ids=range(len(ARITH_TABLE)))
def test_arith_reward_table(response, expected, format_ok):
    assert rewards.arith_score(response, "8 1")["reward"] == expected
    assert score({"task": "arith", "answer": "8 1"}, response) == \
        {"reward": expected, "correct": expected == 1.0, "format_ok": format_ok}


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30) | st.lists(st.sampled_from(["8", "1", " ", "<|im_end|>", "0"]), max_size=8).map("".join))
def test_arith_reward_never_raises(text):
    assert rewards.arith_score(text, "8 1")["reward"] in (0.0, 1.0)


# --- math ---------------------------------------------------------------------------------------------

MATH_TABLE = [  # (reference, boxed answer, equivalent?)
    ("97", "97", True),
    ("97", "097", True),
    ("\\frac{1}{2}", "0.5", True),
    ("\\frac{1}{2}", "\\dfrac{1}{2}", True),
    ("\\frac{1}{2}", "\\tfrac12", True),
    ("\\frac{1}{2}", "1/2", True),
    ("0.5", "\\frac{2}{4}", True),
    ("\\frac{3}{4}", "\\frac{4}{3}", False),
    ("1/3", "0.333", False),
    ("5", "5\\text{ cm}", True),
    ("12", "12 \\text{ dollars}", True),
    ("50\\%", "50", True),
    ("50\\%", "0.5", True),
    ("25", "26\\%", False),
    ("(1,2]", "(1, 2]", True),
    ("(1,2]", "[1,2]", False),
    ("[0, \\infty)", "[0,\\infty)", True),
    ("\\{1,2,3\\}", "\\{3, 2, 1\\}", True),
    ("\\{1,2,3\\}", "\\{1,2\\}", False),
    ("-3", "-3", True),
    ("-3", "3", False),
    ("-\\frac{1}{2}", "-0.5", True),
    ("1500", "1.5\\times10^{3}", True),
    ("1500", "1.5 \\cdot 10^3", True),
    ("1500", "1.5\\times10^{4}", False),
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}", True),
    ("2\\sqrt{3}", "\\sqrt{12}", True),
    ("2\\sqrt{3}", "3\\sqrt{2}", False),
    ("\\pi", "3.14159265", True),
    ("x=3", "3", True),
    ("1000", "1,000", True),
    ("2", "2.0001", False),
    ("\\text{(C)}", "C", True),
    ("\\text{(C)}", "D", False),
]


def test_math_reward_table():
    examples = [{"task": "math", "answer": gold} for gold, _, _ in MATH_TABLE]
    responses = [f"Work... so the answer is $\\boxed{{{pred}}}$." for _, pred, _ in MATH_TABLE]
    results = tasks.load("math").score(examples, responses)
    wrong = [(gold, pred, r) for (gold, pred, same), r in zip(MATH_TABLE, results) if r["correct"] != same]
    assert not wrong
    assert all(r["reward"] == float(r["correct"]) and r["format_ok"] for r in results)
    assert rewards.math_reward("so \\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}") == 1.0
    assert rewards.math_reward("so \\boxed{\\dfrac{1}{2}}", 0.5) == 1.0


def test_math_reward_reads_only_the_last_box():
    response = "First guess \\boxed{3}. No wait, it is \\boxed{4}."
    assert rewards.math_reward(response, "4") == 1.0 and rewards.math_reward(response, "3") == 0.0
    assert rewards.math_reward("The answer is 4.", "4") == 0.0  # no box, no answer
    assert rewards.math_reward("\\boxed{4} and then \\boxed{4", "4") == 0.0  # the last box is unclosed
    assert score({"task": "math", "answer": "4"}, "The answer is 4.") == \
        {"reward": 0.0, "correct": False, "format_ok": False}
    assert score({"task": "math", "answer": "4"}, "\\boxed{5}") == \
        {"reward": 0.0, "correct": False, "format_ok": True}


PATHOLOGICAL = [
    "9^{9^{9^{9}}}",
    "9^9^9^9",
    "10^{10^{10}}!",
    "{" * 300 + "1" + "}" * 300,  # deeply nested braces, under the length cap
    "\\frac{" * 150 + "1" + "}{2}" * 150,
    "1" * 100_000,  # over the length cap
    "(" * 5000,
    "\\left(" * 400 + "x" + "\\right)" * 400,
]


@pytest.mark.parametrize("answer", PATHOLOGICAL, ids=range(len(PATHOLOGICAL)))
def test_pathological_answers_come_back_in_time(answer):
    limit = 2.0
    assert rewards.math_reward("\\boxed{1}", "1.0") == 1.0  # a live worker first: start-up is not the limit's
    start = time.monotonic()
    reward = rewards.math_reward(f"\\boxed{{{answer}}}", "1", timeout_s=limit)
    assert reward == 0.0
    # The limit plus a second of slack for a loaded 2-core machine (the answer is sent to a live worker).
    assert time.monotonic() - start < limit + 1.0


def test_hard_limit_kills_and_replaces_a_stuck_worker():
    pool = verifier.start_pool()
    assert rewards.math_reward("\\boxed{1}", "1.0") == 1.0  # a live worker first
    killed = pool.killed
    before = [w.proc.pid for w in pool.workers]
    start = time.monotonic()
    # math-verify's own alarm is whole seconds (at least 1 s): with a 0.3 s limit only the kill can stop it.
    assert rewards.math_reward("\\boxed{9^{9^{9^{9}}}}", "1", timeout_s=0.3) == 0.0
    assert time.monotonic() - start < 1.3
    assert pool.killed == killed + 1 and len(set(before) - {w.proc.pid for w in pool.workers}) == 1
    # The pool carries on: the replacement starts, later answers are scored normally.
    assert rewards.math_scores(["\\boxed{7}", "\\boxed{7.0}", "\\boxed{8}", "\\boxed{\\frac{14}{2}}"], ["7"] * 4) == [
        {"reward": r, "correct": r == 1.0, "format_ok": True} for r in (1.0, 1.0, 0.0, 1.0)]


def test_math_scores_keep_order_with_slow_answers():
    answers, responses, expected = [], [], []
    for i in range(30):
        answers.append(f"\\frac{{{i}}}{{7}}")
        slow = i in (4, 17)  # answers that take math-verify its whole time limit, finishing out of order
        pred = "9^{9^{9^{9}}}" if slow else (f"{i}/7" if i % 2 else f"{i + 1}/7")
        responses.append(f"\\boxed{{{pred}}}" if i % 5 else "no box")
        expected.append(1.0 if i % 2 and i % 5 and not slow else 0.0)
    assert [r["reward"] for r in rewards.math_scores(responses, answers, timeout_s=2.0)] == expected
    assert rewards.math_scores([], []) == []
    with pytest.raises(ValueError, match="one to one"):
        tasks.load("math").score([{"answer": a} for a in answers], responses[:-1])
    with pytest.raises(ValueError, match="use kk, math, arith"):
        tasks.load("chess")


def test_a_worker_that_died_while_idle_is_replaced():
    pool = verifier.start_pool()
    assert rewards.math_reward("\\boxed{1}", "1.0") == 1.0
    deadline = time.monotonic() + 120
    while not all(w.ready for w in pool.workers):  # idle means started: kill a worker that has said "ready"
        assert time.monotonic() < deadline, "the math-verify workers did not start within 120 s"
        assert pool.verify([("1", "1")] * len(pool.workers)) == [True] * len(pool.workers)
    dead = pool.workers[0].proc
    dead.kill()  # as if the OOM killer took it between two training steps
    dead.wait()
    responses = ["\\boxed{3.0}", "\\boxed{4}", "\\boxed{6/2}"]
    assert rewards.math_scores(responses, ["3"] * 3) == [
        {"reward": r, "correct": r == 1.0, "format_ok": True} for r in (1.0, 0.0, 1.0)]
    assert dead not in [w.proc for w in pool.workers]


def test_a_worker_that_cannot_start_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(verifier.sys, "executable", "/bin/false")  # an interpreter that exits at once
    broken = verifier.VerifierPool(1)
    with pytest.raises(RuntimeError, match="died while starting, twice"):
        broken.verify([("1", "2")])
    assert broken.workers == []  # closed: nothing left running


def test_a_worker_killed_while_starting_is_replaced_once():
    pool = verifier.VerifierPool(1)
    pool.workers[0].proc.kill()  # as if the OOM killer took it while it imported math-verify
    try:
        assert pool.verify([("\\frac{1}{2}", "0.5"), ("3", "4")]) == [True, False]
        assert pool.workers[0].first_start is False and pool.killed == 0
    finally:
        pool.close()


def test_close_pool_and_restart():
    verifier.close_pool()
    assert verifier._POOL is None
    assert rewards.math_reward("\\boxed{2}", "1+1") == 1.0  # a new pool starts on demand
    assert verifier._POOL is not None


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=60), st.text(max_size=20))
def test_math_reward_never_raises_on_any_text(text, reference):
    assert rewards.math_reward(text, "\\frac{1}{2}") in (0.0, 1.0)
    assert rewards.math_reward("\\boxed{" + text + "}", reference or "1") in (0.0, 1.0)
