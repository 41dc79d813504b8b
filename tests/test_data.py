"""data.py: the K&K solver and generator against hand-built and public puzzles, the train/eval split, loaders
(jsonl, parquet, field mapping, errors), and prompts (chat template, prefill)."""
import ast
import copy
import itertools
import json
import os
import random
import re
import subprocess
import sys

import pytest

import data
import tasks

KK = tasks.load("kk")

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
KK_FIXTURE = os.path.join(FIXTURES, "kk_public_test.jsonl")  # 4 public test rows for each of 3..7 people
PUBLIC_ROWS = [json.loads(line) for line in open(KK_FIXTURE)]


def naive_solve(statements, n):
    """An independent solver: evaluate every statement for every assignment, one at a time."""
    def truth(s, a):
        op = s[0]
        if op == "telling-truth":
            return a[s[1]]
        if op == "lying":
            return not a[s[1]]
        if op == "not":
            return not truth(s[1], a)
        vals = [truth(x, a) for x in s[1:]]
        return {"and": all(vals), "or": any(vals), "->": (not vals[0]) or vals[-1], "<=>": vals[0] == vals[-1]}[op]
    found = [a for a in itertools.product([False, True], repeat=n)
             if all(truth(s, a) == a[i] for i, s in enumerate(statements))]
    return sorted(found, key=lambda a: sum(k << i for i, k in enumerate(a)))  # kk_solve's order


HEAD = ("A very special island is inhabited only by knights and knaves. Knights always tell the truth, "
        "and knaves always lie. ")
TAIL = " So who is a knight and who is a knave?"
# The 18 sentence patterns of the public files, written out here independently of data.TEMPLATES.
PATTERNS = ['"{S}" - {X}.', '{X} commented, "{S}".', '{X} was heard saying, "{S}".', "{X} expressed that {S}.",
            'In a statement by {X}: "{S}".', 'According to {X}, "{S}".', "In {X}'s words: \"{S}\".",
            '"{S}," {X} declared.', '{X} said, "{S}."', "{X} said that {S}.", '{X} asserted: "{S}".',
            'As {X} put it, "{S}".', "{X} told you that {S}.", '{X} noted, "{S}".', '"{S}," {X} claimed.',
            '{X} stated, "{S}".', '{X} remarked, "{S}".', '"{S}," {X} mentioned.']


def parse_quiz(quiz, names):
    """Read a quiz back into (statements, patterns used): the inverse of the public wording."""
    listed = " and ".join(names) if len(names) == 2 else ", ".join(names[:-1]) + ", and " + names[-1]
    intro = f"You meet {len(names)} inhabitants: {listed}. "
    assert quiz.startswith(HEAD + intro) and quiz.endswith(TAIL), quiz
    body = quiz[len(HEAD + intro):-len(TAIL)]
    person = {name: i for i, name in enumerate(names)}

    def leaf(text):
        m = re.fullmatch(r"(\w+) is (not )?a (knight|knave)", text)
        base = ("telling-truth" if m.group(3) == "knight" else "lying", person[m.group(1)])
        return ("not", base) if m.group(2) else base

    def statement(text):
        m = re.fullmatch(r"If (.+) then (.+)", text)
        if m:
            return ("->", leaf(m.group(1)), leaf(m.group(2)))
        for op, word in (("<=>", " if and only if "), ("and", " and "), ("or", " or ")):
            if word in text:
                a, b = text.split(word)
                return (op, leaf(a), leaf(b))
        return leaf(text)

    statements, used, pos = [], [], 0
    for name in names:  # one sentence per speaker, in order
        for pattern in PATTERNS:
            regex = re.escape(pattern).replace(r"\{X\}", re.escape(name)).replace(r"\{S\}", "(.+?)")
            m = re.compile(regex + r"(?: |$)").match(body, pos)
            if m:
                statements.append(statement(m.group(1)))
                used.append(pattern)
                pos = m.end()
                break
        else:
            raise AssertionError(f"no public sentence pattern for {name} at: {body[pos:pos + 80]!r}")
    assert pos == len(body)
    return tuple(statements), used


# --- solver -----------------------------------------------------------------------------------------

def test_solver_hand_built_puzzles():
    # A: "A and B are both knaves" -> A cannot be a knight, so A is a knave and (not both) B is a knight.
    assert data.kk_solve((("and", ("lying", 0), ("lying", 1)), ("telling-truth", 1)), 2) == [(False, True)]
    # Both say "I am a knight": every assignment works, in binary order with person 0 as the low bit.
    assert data.kk_solve((("telling-truth", 0), ("telling-truth", 1)), 2) == [
        (False, False), (True, False), (False, True), (True, True)]
    # "I am a knave": no one can say it.
    assert data.kk_solve((("lying", 0),), 1) == []
    # A: "B is a knave"; B: "A is a knight iff C is a knave"; C: "A is a knight". If A were a knave, B would be
    # a knight saying something true, so C a knight, and C's claim false: contradiction. So A, then B, then C.
    statements = (("lying", 1), ("<=>", ("telling-truth", 0), ("lying", 2)), ("telling-truth", 0))
    assert data.kk_solve(statements, 3) == naive_solve(statements, 3) == [(True, False, True)]
    # The public literal string and wider / deeper statements than the generator writes.
    assert data.kk_solve("(('lying', 1), ('<=>', ('telling-truth', 0), ('lying', 2)), ('telling-truth', 0))", 3) == \
        [(True, False, True)]
    deep = (("not", ("and", ("lying", 1), ("lying", 2), ("telling-truth", 0))), ("->", ("lying", 0), ("lying", 2)),
            ("or", ("lying", 0), ("not", ("<=>", ("lying", 1), ("lying", 2))), ("telling-truth", 2)))
    assert data.kk_solve(deep, 3) == naive_solve(deep, 3)


def test_solver_rejects_bad_statements():
    with pytest.raises(ValueError, match="index"):
        data.kk_solve((("lying", 2), ("lying", 0)), 2)
    with pytest.raises(ValueError, match="operator"):
        data.kk_solve((("xor", ("lying", 1), ("lying", 0)), ("lying", 0)), 2)
    with pytest.raises(ValueError, match="one statement per person"):
        data.kk_solve((("lying", 1),), 2)


def test_solver_reproduces_public_solutions():
    for row in PUBLIC_ROWS:
        assert data.kk_solve(row["statements"], len(row["names"])) == [tuple(row["solution"])]


def test_solver_matches_naive_on_random_statements():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randrange(2, 6)
        statements = tuple(data._sample_statement(rng, i, n) for i in range(n))
        assert data.kk_solve(statements, n) == naive_solve(statements, n)


# --- generator --------------------------------------------------------------------------------------

def test_generated_puzzles_have_one_solution_and_the_public_format():
    for row in PUBLIC_ROWS:  # the reader below recovers the public statements from the public quizzes
        assert parse_quiz(row["quiz"], row["names"])[0] == ast.literal_eval(row["statements"])
    public_patterns = {p for row in PUBLIC_ROWS for p in parse_quiz(row["quiz"], row["names"])[1]}
    assert public_patterns == set(PATTERNS) == set(data.TEMPLATES)  # the fixture rows use all 18 patterns
    used = set()
    public_types = {k: type(v) for k, v in PUBLIC_ROWS[0].items()}
    rng = random.Random(1)
    for n in range(2, 9):
        for _ in range(15):
            record = data.make_kk_puzzle(n, rng)
            assert {k: type(v) for k, v in record.items()} == public_types
            assert len(record["names"]) == len(set(record["names"])) == n
            statements = ast.literal_eval(record["statements"])
            assert record["statements"] == repr(statements)  # the public literal format, e.g. "(('lying', 2), ...)"
            if n <= 6:
                assert naive_solve(statements, n) == [tuple(record["solution"])]
            assert data.kk_solve(statements, n) == [tuple(record["solution"])]
            for i, s in enumerate(statements):  # depth <= 2, width 2, no "I am a knave"
                leaves = [s] if s[0] in ("telling-truth", "lying") else list(s[1:])
                assert all(leaf[0] in ("telling-truth", "lying") for leaf in leaves)
                assert len(leaves) == (1 if s[0] in ("telling-truth", "lying", "not") else 2)
                assert ("lying", i) not in leaves
            said, patterns = parse_quiz(record["quiz"], record["names"])
            assert said == statements  # the quiz text says exactly the recorded statements
            used.update(patterns)
            roles = [f"{x} is a {'knight' if k else 'knave'}" for x, k in zip(record["names"], record["solution"])]
            assert record["solution_text_format"] == "\n".join(f"({i + 1}) {r}" for i, r in enumerate(roles))
            assert record["solution_text"].endswith(roles[-1] + ".") and record["solution_text"].startswith(roles[0])
    assert used == public_patterns


def test_generator_statistics_match_public_process():
    # The public files: statement kinds about equally frequent; "I am not a knight/knave" never survives.
    kinds = {}
    rng = random.Random(2)
    for _ in range(300):
        record = data.make_kk_puzzle(5, rng)
        for i, s in enumerate(ast.literal_eval(record["statements"])):
            kind = s[0] if s[0] != "telling-truth" else "lying"  # leaves together
            kinds[kind] = kinds.get(kind, 0) + 1
            assert s != ("not", ("telling-truth", i)) and s != ("not", ("lying", i))
    total = sum(kinds.values())
    assert set(kinds) == {"lying", "not", "and", "or", "->", "<=>"}
    assert all(0.12 < c / total < 0.22 for c in kinds.values()), kinds


def test_generator_is_deterministic():
    assert data.make_kk_puzzle(6, random.Random(5)) == data.make_kk_puzzle(6, random.Random(5)) == \
        data.make_kk_puzzle(6, 5)
    assert data.make_kk_puzzle(6, random.Random(5)) != data.make_kk_puzzle(6, random.Random(6))
    with pytest.raises(ValueError, match="people"):
        data.make_kk_puzzle(1, 0)


def test_kk_examples_train_never_meets_eval():
    evals = data.kk_examples(per_level=20, split="eval")
    assert evals == data.kk_examples(per_level=20, seed=123, split="eval")  # fixed, whatever the seed
    assert data.kk_examples(per_level=10, split="eval") == [e for e in evals if int(e["id"].rsplit("-", 1)[1]) < 10]
    train = data.kk_examples(per_level=20, seed=0)
    assert train != data.kk_examples(per_level=20, seed=1)
    # PPL2 has only 399 valid structures: a large train set would hit eval often if nothing kept them apart.
    train += data.kk_examples(people=[2], per_level=300, seed=7)
    evals += data.kk_examples(people=[2], per_level=100, split="eval")
    assert not {e["question"] for e in train} & {e["question"] for e in evals}
    structure = lambda e: parse_quiz(e["question"], e["names"])[0]  # noqa: E731  (names and wording aside)
    train_structures = {(e["level"], structure(e)) for e in train}
    assert len(train_structures) > 200 and not train_structures & {(e["level"], structure(e)) for e in evals}
    assert [e["level"] for e in evals[:40]] == ["PPL2"] * 20 + ["PPL3"] * 20
    for e in evals:
        assert set(e) == {"task", "question", "answer", "solution", "names", "level", "id"} and e["task"] == "kk"
        assert e["answer"].startswith("(1) ") and len(e["solution"]) == len(e["names"]) == int(e["level"][3:])
    with pytest.raises(ValueError, match="split"):
        data.kk_examples(split="test")


def test_split_of_structures_is_stable():
    # The split is a pure function of the structure: an old eval set stays held out after any change of seed.
    row = PUBLIC_ROWS[0]
    assert data.kk_split_of(3, row["statements"]) == data.kk_split_of(3, ast.literal_eval(row["statements"]))
    splits = [data.kk_split_of(5, data.make_kk_puzzle(5, s)["statements"]) for s in range(400)]
    assert 0.06 < splits.count("eval") / 400 < 0.2


# --- loaders ----------------------------------------------------------------------------------------

def test_load_kk_jsonl_and_parquet(tmp_path):
    examples = data.load_kk(KK_FIXTURE)
    assert len(examples) == 20 and [e["level"] for e in examples[::4]] == ["PPL3", "PPL4", "PPL5", "PPL6", "PPL7"]
    first = examples[0]
    assert first["question"] == PUBLIC_ROWS[0]["quiz"] and first["answer"] == PUBLIC_ROWS[0]["solution_text_format"]
    assert first["solution"] == [True, True, False] and first["id"] == "kk_public_test-1000"
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = str(tmp_path / "people3_test.parquet")
    pq.write_table(pa.Table.from_pylist(PUBLIC_ROWS), path)
    assert [{k: v for k, v in e.items() if k != "id"} for e in data.load_kk(path)] == \
        [{k: v for k, v in e.items() if k != "id"} for e in examples]


def test_load_kk_errors_name_file_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    rows = [dict(PUBLIC_ROWS[0]), {k: v for k, v in PUBLIC_ROWS[1].items() if k != "solution"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: missing field 'solution'"):
        data.load_kk(str(path))
    path.write_text(json.dumps(dict(PUBLIC_ROWS[0], solution=[True])) + "\n")
    with pytest.raises(ValueError, match="line 1: field 'solution' must be 3 booleans"):
        data.load_kk(str(path))
    path.write_text(json.dumps(PUBLIC_ROWS[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match="line 2: not a JSON object"):
        data.load_kk(str(path))
    with pytest.raises(ValueError, match="unknown file type"):
        data.load_kk(str(tmp_path / "x.csv")) if (tmp_path / "x.csv").write_text("a") else None
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        data.load_kk(str(tmp_path / "nope.jsonl"))


def test_load_math_field_mapping(tmp_path):
    aime = data.load_math(os.path.join(FIXTURES, "aime_2021_2024.jsonl"))
    assert aime[0]["answer"] == "97" and aime[0]["level"] == "aime" and aime[0]["id"] == "aime-2021-I-1"
    assert aime[0]["question"].startswith("Zou and Chou") and aime[0]["task"] == "math"
    amc = data.load_math(os.path.join(FIXTURES, "amc_2022_2023.jsonl"), level="amc22")
    assert [e["answer"] for e in amc] == ["142", "144", "81"] and amc[0]["level"] == "amc22"  # floats 142.0 -> "142"
    assert amc[0]["question"].startswith("$\\frac{m}{n}$")
    rows = [
        {"question": "Natalia sold 48 clips...", "answer": "She sold 48/2 = 24 in May.\n#### 72"},  # GSM8K
        {"problem": "Compute $x$.",
         "solution": "So $x = \\boxed{\\frac{1}{2}}$, not \\boxed{3}... wait \\boxed{\\dfrac{1}{2}}."},
        {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "What is 2+2?"}],
         "reward_model": {"ground_truth": "4", "style": "rule"}},  # verl-style parquet rows
        {"question": "What is 0.5 + 0.25?", "answer": 0.75},
    ]
    path = tmp_path / "mixed_set.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    mixed = data.load_math(str(path))
    assert [e["answer"] for e in mixed] == ["72", "\\dfrac{1}{2}", "4", "0.75"]
    assert mixed[2]["question"] == "What is 2+2?" and {e["level"] for e in mixed} == {"mixed"}
    assert len({e["id"] for e in mixed}) == 4
    own = tmp_path / "test.jsonl"
    own.write_text(json.dumps({"q": "1+1?", "meta": {"gold": "2"}}) + "\n")
    assert data.load_math(str(own), question_key="q", answer_key="meta.gold") == [
        {"task": "math", "question": "1+1?", "answer": "2", "level": tmp_path.name, "id": f"{tmp_path.name}-0"}]


def test_load_math_errors(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    path.write_text(json.dumps({"question": "a", "answer": "#### 1"}) + "\n" + json.dumps({"question": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"gsm8k\.jsonl, line 2: missing answer field \(looked for answer"):
        data.load_math(str(path))
    path.write_text(json.dumps({"text": "a", "answer": "1"}) + "\n")
    with pytest.raises(ValueError, match="line 1: missing question field .*question_key"):
        data.load_math(str(path))
    path.write_text(json.dumps({"question": "a", "solution": "so \\boxed{12"}) + "\n")
    with pytest.raises(ValueError, match="unclosed"):
        data.load_math(str(path))


def test_pyarrow_only_imported_for_parquet():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (f"import sys; sys.path.insert(0, {root!r}); import data; data.load_kk({KK_FIXTURE!r}); "
            f"data.load_math({os.path.join(FIXTURES, 'amc_2022_2023.jsonl')!r}); "
            "assert 'pyarrow' not in sys.modules, 'pyarrow imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_extract_boxed():
    assert data.extract_boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}} end") == "\\frac{1}{2}"
    assert data.extract_boxed("\\boxed{\\{1, 2\\}} and \\boxed{ {a}{b} }") == " {a}{b} "
    assert data.extract_boxed("\\boxed 5$") == "5" and data.extract_boxed("\\fbox{7}") == "7"
    assert data.extract_boxed("\\boxed{1} then \\boxed{2") is None  # the last box is open: no answer
    assert data.extract_boxed("no box") is None and data.extract_boxed("\\boxed") is None
    assert data.extract_boxed("\\boxed{" * 50000) is None


# --- prompts ----------------------------------------------------------------------------------------

# (interface change: prompts are the task's: tasks.prompt_ids(task, example, tokenizer), tasks.py)
def test_build_prompt_chat_template_and_prefill(tiny_tokenizer):
    kk = data.kk_examples(people=[3], per_level=1, split="eval")[0]
    ids, prefill = tasks.prompt_ids(KK, kk, tiny_tokenizer)
    text = tiny_tokenizer.decode(ids)
    assert prefill == "<think>" and text.endswith("<|im_start|>assistant\n<think>")
    assert text.startswith("<|im_start|>user\n") and kk["question"] in text and "<answer>" in text
    expected = tiny_tokenizer.apply_chat_template([{"role": "user", "content": KK.prompt(kk)}],
                                                  tokenize=False, add_generation_prompt=True) + "<think>"
    assert ids == tiny_tokenizer(expected, add_special_tokens=False)["input_ids"]
    math = data.load_math(os.path.join(FIXTURES, "aime_2021_2024.jsonl"))[0]
    ids, prefill = tasks.prompt_ids(tasks.load("math"), math, tiny_tokenizer)
    text = tiny_tokenizer.decode(ids)
    assert prefill == "" and text.endswith("\\boxed{}.<|im_end|>\n<|im_start|>assistant\n")
    assert math["question"] in text
    thinking = type("thinking_math", (tasks.Math,), {"prefill": "<think>"})  # a task of your own with a prefill
    ids, prefill = tasks.prompt_ids(tasks.load(thinking), math, tiny_tokenizer)
    assert prefill == "<think>" and tiny_tokenizer.decode(ids).endswith("assistant\n<think>")


def test_build_prompt_when_the_template_opens_think_itself(tiny_tokenizer):
    r1 = copy.deepcopy(tiny_tokenizer)  # like DeepSeek-R1-Distill's template, which ends with "<think>\n"
    r1.chat_template = tiny_tokenizer.chat_template.replace("'<|im_start|>assistant\n'",
                                                            "'<|im_start|>assistant\n<think>\n'")
    assert r1.chat_template != tiny_tokenizer.chat_template
    kk = data.kk_examples(people=[3], per_level=1, split="eval")[0]
    ids, prefill = tasks.prompt_ids(KK, kk, r1)
    assert r1.decode(ids).endswith("<|im_start|>assistant\n<think>\n") and r1.decode(ids).count("<think>") == 2
    assert prefill == "<think>\n"  # the instruction mentions <think> once, the turn opens it once


def test_build_prompt_without_chat_template(tiny_tokenizer):
    """(interface change: a tokenizer without a chat template gets the bare message, then the prefill)"""
    plain = copy.deepcopy(tiny_tokenizer)
    plain.chat_template = None
    kk = data.kk_examples(people=[2], per_level=1, split="eval")[0]
    ids, prefill = tasks.prompt_ids(KK, kk, plain)
    assert plain.decode(ids, skip_special_tokens=True) == KK.prompt(kk) + "<think>" and prefill == "<think>"
    own = tasks.load(type("chess", (), {"examples": staticmethod(lambda split, source: []),
                                        "score": staticmethod(lambda examples, responses: [])}))
    ids, prefill = tasks.prompt_ids(own, {"question": "e4 or d4?", "id": "c1"}, plain)  # default prompt: question
    assert plain.decode(ids, skip_special_tokens=True) == "e4 or d4?" and prefill == ""
    with pytest.raises(KeyError):
        tasks.prompt_ids(own, {"id": "c2"}, plain)


# --- arithmetic (the CPU miniature's task) ----------------------------------------------------------

def test_arith_problems_and_split():
    rng = random.Random(0)
    for n in range(2, 9):
        for _ in range(50):
            question, answer = data.make_arith_problem(n, rng)
            tokens = question.split()
            assert tokens[-1] == "=" and len(tokens) == 2 * n and all(len(t) == 1 for t in tokens)
            value, running = int(tokens[0]), []
            for op, digit in zip(tokens[1:-1:2], tokens[2:-1:2]):
                value = (value + int(digit)) % 10 if op == "+" else (value - int(digit)) % 10
                running.append(str(value))
            assert answer == " ".join(running)
    assert data.make_arith_problem(3, random.Random(4)) == data.make_arith_problem(3, 4)
    evals = data.arith_examples(per_level=30, split="eval")
    assert evals == data.arith_examples(per_level=30, seed=9, split="eval")
    train = data.arith_examples(per_level=300, seed=1)
    assert [e["level"] for e in evals[::30]] == [f"L{n}" for n in range(2, 9)]
    assert all(set(e) == {"task", "question", "answer", "level", "id"} and e["task"] == "arith" for e in evals)
    # L2 has 200 distinct problems: 300 training draws cover most of the training side and none of eval.
    assert not {e["question"] for e in train} & {e["question"] for e in evals}
    assert len({e["question"] for e in train if e["level"] == "L2"}) > 100
    with pytest.raises(ValueError, match="operands"):
        data.make_arith_problem(1, 0)


def test_arith_prompt_is_the_filled_problem_without_chat_template(tiny_tokenizer):
    """The problem filled with "_ _" per operand short of the width (8): every level's prompt has the same length."""
    example = {"task": "arith", "question": "3 + 5 - 7 =", "answer": "8 1", "level": "L3", "id": "x"}
    filled = "3 + 5 - 7" + " _ _" * 5 + " ="
    plain = copy.deepcopy(tiny_tokenizer)
    plain.chat_template = None
    arith = tasks.load("arith")
    ids, prefill = tasks.prompt_ids(arith, example, plain)
    assert prefill == "" and plain.decode(ids, skip_special_tokens=True) == filled
    ids, _ = tasks.prompt_ids(arith, example, tiny_tokenizer)
    assert tiny_tokenizer.decode(ids) == f"<|im_start|>user\n{filled}<|im_end|>\n<|im_start|>assistant\n"
    full = {"task": "arith", "question": " + ".join("1" * 8) + " =", "answer": "2 3 4 5 6 7 8", "level": "L8", "id": "y"}
    assert arith.prompt(full) == full["question"]  # the widest level needs no fill
