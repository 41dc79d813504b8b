"""Where examples come from: the Knights-and-Knaves generator and solver, the arithmetic generator, and loaders
for K&K and math files (jsonl, parquet, hub datasets). tasks.py turns these into tasks (prompt, examples, scorer).

An *Example* is a plain dict: {"task", "question", "answer", "level" ("PPL2".."PPL8", "L2".."L8", or a math
benchmark's name), "id"}, plus "solution" and "names" for K&K.

Knights and Knaves (Xie et al. 2024; docs/algorithm.md, "Tasks and rewards"). Each of n islanders makes one statement,
in the public data's literal format (the K&K dataset's `statements` field):

    leaf   ('telling-truth', i) "X is a knight" | ('lying', i) "X is a knave"
    depth2 ('not', leaf) | ('and', leaf, leaf) | ('or', leaf, leaf) | ('->', leaf, leaf) | ('<=>', leaf, leaf)

A puzzle is valid when exactly one knight/knave assignment makes every knight's statement true and every
knave's false. The solver checks all 2^n assignments at once with bit masks: bit `a` of an integer stands
for assignment `a` (person i is a knight in it when bit i of `a` is set), so "person i is a knight" is one
(2^n)-bit integer K_i, a statement's truth over all assignments is a few bitwise operations on those
integers, and the assignments where everyone is consistent are

    consistent = AND_i  NOT(K_i XOR S_i)        (a knight says a true thing, a knave a false thing)

The sampler follows the public generator's process, checked against the public files' statistics:
statement kind uniform over {leaf, not, and, or, ->, <=>}, leaf person uniform over everyone with
"I am a knave" (a paradox) excluded, the two leaves of a binary statement distinct; then rejection of
puzzles without exactly one solution. 10,000 eight-person puzzles, text included, take about 1 s of CPU
on one core (benchmarks/bench_tasks.py).

Held-out evaluation: a puzzle's identity is its statement structure (names and wording aside); a stable
hash of it puts 1 in EVAL_BUCKETS structures in the evaluation split and the rest in the training split,
so generated training puzzles can never coincide with evaluation puzzles, whatever the seeds and sizes.

    python data.py kk 3 [N]     # print N generated 3-person puzzles with their solutions
"""
import ast
import hashlib
import json
import os
import random
import sys

# ------------------------------------------------------------------------------------------- knights and knaves: solver

_MASKS = {}  # n -> (FULL, [K_0, ..., K_{n-1}])


def _masks(n):
    """FULL = all 2^n assignments; K_i = the assignments in which person i is a knight (bit i of a set)."""
    if n not in _MASKS:
        size = 1 << n
        full = (1 << size) - 1
        knights = []
        for i in range(n):
            # Assignments 0..2^n-1 read bit i as: 2^i zeros, 2^i ones, repeated.
            block = ((1 << (1 << i)) - 1) << (1 << i)  # one period: 2^(i+1) bits, the upper half set
            period = 1 << (i + 1)
            mask = 0
            for start in range(0, size, period):
                mask |= block << start
            knights.append(mask)
        _MASKS[n] = (full, knights)
    return _MASKS[n]


def _truth(stmt, n, full, knights):
    """Truth of one statement over all 2^n assignments, as a (2^n)-bit integer."""
    if not isinstance(stmt, (tuple, list)) or not stmt:
        raise ValueError(f"bad K&K statement {stmt!r}: expected a tuple such as ('lying', 2)")
    op = stmt[0]
    if op in ("telling-truth", "lying"):
        if len(stmt) != 2 or not isinstance(stmt[1], int) or not 0 <= stmt[1] < n:
            raise ValueError(f"bad K&K statement {stmt!r}: the person index must be an int in [0, {n})")
        return knights[stmt[1]] if op == "telling-truth" else full ^ knights[stmt[1]]
    args = [_truth(s, n, full, knights) for s in stmt[1:]]
    if op == "not" and len(args) == 1:
        return full ^ args[0]
    if op == "and" and args:
        out = full
        for a in args:
            out &= a
        return out
    if op == "or" and args:
        out = 0
        for a in args:
            out |= a
        return out
    if op == "->" and len(args) == 2:
        return (full ^ args[0]) | args[1]
    if op == "<=>" and len(args) == 2:
        return full ^ (args[0] ^ args[1])
    raise ValueError(f"bad K&K statement {stmt!r}: unknown operator {op!r} or wrong number of operands")


def _consistent(i, stmt, n):
    """The assignments in which person i's statement fits their role: a knight says a true thing, a knave a false
    one (the solver's AND over i of these is the puzzle's solution set; the generator builds it person by person)."""
    full, knights = _masks(n)
    return full ^ (knights[i] ^ _truth(stmt, n, full, knights))


def kk_solve(statements, n):
    """Every assignment (tuple of bools, True = knight, person order) under which each knight's statement is
    true and each knave's false. `statements` is the public literal (a string) or the parsed tuple.

    Assignments come in increasing order of the binary number whose bit i is person i.
    """
    if isinstance(statements, str):
        statements = ast.literal_eval(statements)
    if len(statements) != n:
        raise ValueError(f"kk_solve: {len(statements)} statements for {n} people; need one statement per person")
    consistent = _masks(n)[0]
    for i, stmt in enumerate(statements):
        consistent &= _consistent(i, stmt, n)
    out = []
    while consistent:
        low = consistent & -consistent  # lowest set bit = smallest assignment left
        a = low.bit_length() - 1
        out.append(tuple(bool(a >> i & 1) for i in range(n)))
        consistent ^= low
    return out


# -------------------------------------------------- knights and knaves: generator (records in the public data's format)

# The public files' 51 names and 18 sentence templates ({X} speaker, {S} statement text), with their quirks.
NAMES = (
    "Abigail Aiden Alexander Amelia Aria Aurora Ava Avery Benjamin Charlotte Chloe Daniel David Elizabeth Ella "
    "Emily Emma Ethan Evelyn Grace Harper Henry Isabella Jack Jackson Jacob James Joseph Liam Lily Logan Lucas "
    "Luke Mason Matthew Mia Michael Noah Oliver Olivia Owen Penelope Riley Samuel Scarlett Sebastian Sofia "
    "Sophia Victoria William Zoey"
).split()
TEMPLATES = (
    '"{S}" - {X}.', '{X} commented, "{S}".', '{X} was heard saying, "{S}".', "{X} expressed that {S}.",
    'In a statement by {X}: "{S}".', 'According to {X}, "{S}".', "In {X}'s words: \"{S}\".", '"{S}," {X} declared.',
    '{X} said, "{S}."', "{X} said that {S}.", '{X} asserted: "{S}".', 'As {X} put it, "{S}".',
    "{X} told you that {S}.", '{X} noted, "{S}".', '"{S}," {X} claimed.', '{X} stated, "{S}".',
    '{X} remarked, "{S}".', '"{S}," {X} mentioned.',
)
QUIZ_HEAD = ("A very special island is inhabited only by knights and knaves. Knights always tell the truth, "
             "and knaves always lie. ")
QUIZ_TAIL = " So who is a knight and who is a knave?"
_BINARY = ("and", "or", "->", "<=>")
_CONNECTIVE = {"and": "and", "or": "or", "<=>": "if and only if"}
MAX_PEOPLE = 12  # 2^12-bit masks are still instant; past that brute force and the name pool run thin


def _sample_leaf(rng, speaker, n):
    while True:
        leaf = (rng.choice(("telling-truth", "lying")), rng.randrange(n))
        if leaf != ("lying", speaker):  # "I am a knave" has no consistent speaker: the public generator skips it
            return leaf


def _sample_statement(rng, speaker, n):
    kind = rng.randrange(6)  # leaf, not, and, or, ->, <=> equally likely
    if kind == 0:
        return _sample_leaf(rng, speaker, n)
    if kind == 1:
        return ("not", _sample_leaf(rng, speaker, n))
    a = _sample_leaf(rng, speaker, n)
    b = _sample_leaf(rng, speaker, n)
    while b == a:
        b = _sample_leaf(rng, speaker, n)
    return (_BINARY[kind - 2], a, b)


def _sample_statements(n, rng):
    """Statements with exactly one consistent assignment, and that assignment (rejection sampling)."""
    full = _masks(n)[0]
    while True:
        statements, consistent = [], full
        for i in range(n):
            stmt = _sample_statement(rng, i, n)
            statements.append(stmt)
            consistent &= _consistent(i, stmt, n)
            if not consistent:  # already no solution: restart (same distribution as sample-all-then-reject)
                break
        if consistent and not consistent & (consistent - 1):  # exactly one bit set
            a = consistent.bit_length() - 1
            return tuple(statements), [bool(a >> i & 1) for i in range(n)]


def _statement_text(stmt, names):
    op = stmt[0]
    if op == "telling-truth":
        return f"{names[stmt[1]]} is a knight"
    if op == "lying":
        return f"{names[stmt[1]]} is a knave"
    if op == "not":
        role = "knight" if stmt[1][0] == "telling-truth" else "knave"
        return f"{names[stmt[1][1]]} is not a {role}"
    a, b = (_statement_text(s, names) for s in stmt[1:])
    if op == "->":
        return f"If {a} then {b}"  # capital "If" even mid-sentence, as in the public data
    return f"{a} {_CONNECTIVE[op]} {b}"


def _join(items):
    return " and ".join(items) if len(items) == 2 else ", ".join(items[:-1]) + ", and " + items[-1]


def make_kk_puzzle(n, rng, index=0):
    """One n-person puzzle with a unique solution, as a record with the public data's fields.

    rng: a random.Random (the whole puzzle is a function of its state), or an int seed.
    """
    if not isinstance(n, int) or not 2 <= n <= MAX_PEOPLE:
        raise ValueError(f"make_kk_puzzle: n={n!r} people; use an int in [2, {MAX_PEOPLE}]")
    if not isinstance(rng, random.Random):
        rng = random.Random(rng)
    statements, solution = _sample_statements(n, rng)
    names = rng.sample(NAMES, n)
    said = [rng.choice(TEMPLATES).format(X=names[i], S=_statement_text(s, names)) for i, s in enumerate(statements)]
    roles = [f"{name} is a {'knight' if k else 'knave'}" for name, k in zip(names, solution)]
    return {
        "quiz": QUIZ_HEAD + f"You meet {n} inhabitants: {_join(names)}. " + " ".join(said) + QUIZ_TAIL,
        "names": names,
        "solution": solution,
        "solution_text": _join(roles) + ".",
        "solution_text_format": "\n".join(f"({i + 1}) {r}" for i, r in enumerate(roles)),
        "statements": repr(statements),
        "index": index,
    }


EVAL_BUCKETS = 8  # 1 in 8 statement structures is reserved for evaluation
EVAL_SEED = "rlad-kk-eval"


def _split_of(key):
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return "eval" if int.from_bytes(digest, "little") % EVAL_BUCKETS == 0 else "train"


def kk_split_of(n, statements):
    """"eval" or "train": the split a puzzle structure belongs to (stable across machines and Python runs)."""
    return _split_of(f"{n}:{statements if isinstance(statements, str) else repr(tuple(statements))}")


def kk_example(record, id, level=None):
    """A K&K Example from a public-format record."""
    return {"task": "kk", "question": record["quiz"], "answer": record["solution_text_format"],
            "solution": [bool(s) for s in record["solution"]], "names": list(record["names"]),
            "level": level or f"PPL{len(record['names'])}", "id": id}


def kk_examples(people=range(2, 9), per_level=100, seed=0, split="train"):
    """Generated K&K Examples, `per_level` puzzles for each n in `people`, level by level.

    split="eval" is the fixed held-out set (`seed` is ignored: eval with per_level=k is the first k puzzles
    of a fixed stream); split="train" draws from `seed` and only from structures outside the eval split.
    Structures can repeat within a split (PPL2 has only 399 distinct valid structures).
    """
    if split not in ("train", "eval"):
        raise ValueError(f"kk_examples: split={split!r}; use 'train' or 'eval'")
    out = []
    for n in people:
        rng = random.Random(f"{EVAL_SEED}-{n}" if split == "eval" else f"rlad-kk-train-{seed}-{n}")
        count = 0
        while count < per_level:
            record = make_kk_puzzle(n, rng, index=count)
            if kk_split_of(n, record["statements"]) != split:
                continue
            out.append(kk_example(record, f"kk-{split}-PPL{n}-{count}"))
            count += 1
    return out


# -------------------------------------------------------- arithmetic: running sums mod 10, small enough to train on CPU
# Level L{n} has n single-digit operands joined by + and -; the answer is the running value mod 10 after each
# operation, a scratchpad of n - 1 digits: "3 + 5 - 7 =" -> "8 1". The response is that scratchpad, then the
# end-of-sequence token; rewards.arith_score pays 1 for exactly n - 1 digits whose last one is right.

ARITH_LEVELS = range(2, 9)


def make_arith_problem(n, rng):
    """(question, answer) for n operands, e.g. ("3 + 5 - 7 =", "8 1")."""
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"make_arith_problem: n={n!r} operands; use an int >= 2")
    if not isinstance(rng, random.Random):
        rng = random.Random(rng)
    value = rng.randrange(10)
    question, running = [str(value)], []
    for _ in range(n - 1):
        op, digit = rng.choice("+-"), rng.randrange(10)
        value = (value + digit if op == "+" else value - digit) % 10
        question += [op, str(digit)]
        running.append(str(value))
    return " ".join(question) + " =", " ".join(running)


def arith_examples(levels=ARITH_LEVELS, per_level=100, seed=0, split="train"):
    """Arithmetic Examples ({"task": "arith", "question", "answer", "level": "L{n}", "id"}), level by level.

    As for K&K: split="eval" is a fixed stream (seed ignored), split="train" draws from `seed`, and a stable
    hash of the question puts 1 in EVAL_BUCKETS problems in eval only (L2 has just 200 distinct problems).
    """
    if split not in ("train", "eval"):
        raise ValueError(f"arith_examples: split={split!r}; use 'train' or 'eval'")
    out = []
    for n in levels:
        rng = random.Random(f"rlad-arith-eval-{n}" if split == "eval" else f"rlad-arith-train-{seed}-{n}")
        count = 0
        while count < per_level:
            question, answer = make_arith_problem(n, rng)
            if _split_of(f"arith:{question}") != split:
                continue
            out.append({"task": "arith", "question": question, "answer": answer, "level": f"L{n}",
                        "id": f"arith-{split}-L{n}-{count}"})
            count += 1
    return out


# ----------------------------------------------------------------------- loaders: jsonl / parquet in the public formats

def _rows(path):
    """(where, row) for each row of a .jsonl or .parquet file or a hub dataset (hf:..., see _hub_rows); `where`
    names source and row for errors."""
    if path.startswith("hf:"):
        yield from _hub_rows(path)
        return
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq  # only needed here; a plain install does without it
        except ImportError as e:
            raise ImportError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from e
        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}, row {i}", row
        return
    if not path.endswith((".jsonl", ".json")):
        raise ValueError(f"{path}: unknown file type; use .jsonl (one JSON object per line) or .parquet")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: not a JSON object ({e}); expected JSON lines") from e
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}")
            yield f"{path}, line {lineno}", row


def _hub_rows(path):
    """(where, row) of a hub dataset hf:NAME[:CONFIG]:SPLIT: the last part is the split, an optional middle part
    the config, as in hf:openai/gsm8k:main:train or hf:Skywork/Skywork-OR1-RL-Data:math (a slice such as
    train[:1000] works too).
    It loads through the `datasets` library (imported only then): from the Hub, or when the Hub is unreachable
    (HF_HUB_OFFLINE=1) from the hub cache's snapshot of the repo, as `hf download` or an earlier load left it.
    """
    head, bracket, tail = path[3:].partition("[")  # a slice such as train[:1000] has colons of its own
    parts = head.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"{path}: expected hf:NAME[:CONFIG]:SPLIT, e.g. hf:openai/gsm8k:main:train")
    name, config, split = parts[0], parts[1] if len(parts) == 3 else None, parts[-1] + bracket + tail
    try:
        import datasets
        import huggingface_hub
    except ImportError as e:
        raise ImportError(f"{path}: hub datasets need the datasets library (pip install datasets)") from e
    offline = False
    try:
        try:
            table = datasets.load_dataset(name, config, split=split)
        except ConnectionError:  # offline or no network: the hub cache's snapshot
            offline = True
            local = huggingface_hub.snapshot_download(name, repo_type="dataset", local_files_only=True)
            table = datasets.load_dataset(local, config, split=split)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"{path}: no dataset {name!r} on the Hub or in the hub cache {huggingface_hub.constants.HF_HUB_CACHE} "
            f"({type(e).__name__}); check the name (gated: hf auth login), or to work offline download it "
            f"first: hf download {name} --repo-type dataset") from None
    except ValueError as e:  # unknown config or split, or (offline) its files are not in the cache
        fix = f"; offline, only cached files load: hf download {name} --repo-type dataset" if offline else ""
        raise ValueError(f"{path}: {' '.join(str(e).split())} (sources are hf:NAME[:CONFIG]:SPLIT{fix})") from None
    for i, row in enumerate(table.to_list()):
        yield f"hf:{name}{f' config {config}' if config else ''} split {split}, row {i}", row


def _stem(path):
    return os.path.basename(path).split(".")[0]


def load_kk(path):
    """K&K Examples from a public-format file (fields quiz, names, solution; solution_text_format optional)."""
    out = []
    for where, row in _rows(path):
        for field in ("quiz", "names", "solution"):
            if field not in row:
                raise ValueError(f"{where}: missing field {field!r} (K&K rows need quiz, names, solution)")
        names, solution = row["names"], row["solution"]
        if not isinstance(names, list) or not all(isinstance(x, str) for x in names):
            raise ValueError(f"{where}: field 'names' must be a list of strings, got {names!r}")
        if not (isinstance(solution, list) and len(solution) == len(names) and all(type(s) is bool for s in solution)):
            raise ValueError(f"{where}: field 'solution' must be {len(names)} booleans (one per name), "
                             f"got {solution!r}")
        record = dict(row)
        if not record.get("solution_text_format"):
            record["solution_text_format"] = "\n".join(
                f"({i + 1}) {x} is a {'knight' if k else 'knave'}" for i, (x, k) in enumerate(zip(names, solution)))
        out.append(kk_example(record, f"{_stem(path)}-{row.get('index', len(out))}"))
    return out


def extract_boxed(text):
    """Content of the LAST \\boxed{...} (or \\fbox{...}) in text, braces matched; None when there is none.

    Linear in len(text). An unclosed last box gives None (no answer), not an earlier box.
    """
    if not isinstance(text, str):
        return None
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (6 if text.startswith("\\boxed", start) else 5)
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":  # "\boxed 5": the answer runs to the next space or dollar sign
        end = i
        while end < len(text) and text[end] not in " $\n":
            end += 1
        return text[i:end] or None
    depth = 0
    for j in range(i, len(text)):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None


def _field(row, key):
    """row[key], with dotted keys reaching into nested dicts ("reward_model.ground_truth")."""
    value = row
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _answer_string(value, where, key):
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{where}: field {key!r} is {value!r}; expected the reference answer")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # AMC files store 97.0 for 97
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)) and value:
        return _answer_string(value[0], where, key)
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {key!r} has type {type(value).__name__}; expected a string or number")
    if "####" in value:  # GSM8K: worked solution, then "#### 42"
        value = value.rsplit("####", 1)[1]
    elif "\\boxed" in value or "\\fbox" in value:  # a MATH-style worked solution
        boxed = extract_boxed(value)
        if boxed is None:
            raise ValueError(f"{where}: field {key!r} has an unclosed \\boxed{{}}")
        value = boxed
    value = value.strip().strip("$").strip()
    if not value:
        raise ValueError(f"{where}: field {key!r} is empty")
    return value


def load_math(path, question_key=None, answer_key=None, level=None):
    """Math Examples from .jsonl / .parquet. Fields found automatically unless given:
    question from question / problem / prompt (a string or a list of chat messages); answer from answer
    (a string, a number such as AMC's 97.0, or GSM8K's "... #### 42"), else solution (MATH: last \\boxed{}),
    else reward_model.ground_truth (verl-style files). Dotted keys reach into nested fields.
    level: the table column; default the file name up to its first "_" or "-" ("aime_2021_2024" -> "aime").
    """
    if level is None and path.startswith("hf:"):  # a hub dataset's level is its name: hf:openai/gsm8k:main -> gsm8k
        level = path[3:].split(":")[0].split("/")[-1]
    if level is None:
        level = _stem(path).split("_")[0].split("-")[0]
        if level.lower() in ("train", "test", "validation", "val", "dev"):  # HF layout: name/test-0000.parquet
            level = os.path.basename(os.path.dirname(os.path.abspath(path))) or level
    out = []
    for where, row in _rows(path):
        qkeys = [question_key] if question_key else ["question", "problem", "prompt"]
        qkey = next((k for k in qkeys if _field(row, k) is not None), None)
        if qkey is None:
            raise ValueError(f"{where}: missing question field (looked for {', '.join(qkeys)}); pass question_key=")
        question = _field(row, qkey)
        if isinstance(question, list):  # chat messages: the last user turn
            users = [m.get("content") for m in question if isinstance(m, dict) and m.get("role") == "user"]
            question = users[-1] if users else None
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{where}: field {qkey!r} is not a non-empty string or list of chat messages")
        akeys = [answer_key] if answer_key else ["answer", "solution", "reward_model.ground_truth"]
        akey = next((k for k in akeys if _field(row, k) not in (None, "")), None)
        if akey is None:
            raise ValueError(f"{where}: missing answer field (looked for {', '.join(akeys)}); pass answer_key=")
        answer = _answer_string(_field(row, akey), where, akey)
        rid = row.get("id", row.get("idx", row.get("unique_id", len(out))))
        out.append({"task": "math", "question": question.strip(), "answer": answer, "level": level,
                    "id": f"{level}-{rid}"})
    return out


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "kk":
        sys.exit("usage: python data.py kk N_PEOPLE [COUNT]")
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    for i in range(count):
        record = make_kk_puzzle(int(sys.argv[2]), random.Random(i))
        print(record["quiz"], "\n", record["solution_text_format"], "\n", record["statements"], "\n", sep="")
