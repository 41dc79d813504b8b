"""Where examples come from: the Knights-and-Knaves generator and solver, the arithmetic generator, and loaders
for K&K and math files (jsonl, parquet, hub datasets). tasks.py turns these into tasks (prompt, examples, scorer).
An *Example* is a plain dict: {"task", "question", "answer", "level" ("PPL2".."PPL8", "L2".."L8", or a math
benchmark's name), "id"}, plus "solution" and "names" for K&K.

Knights and Knaves (Xie et al. 2024; docs/algorithm.md, "Tasks and rewards"). Each of n islanders makes one statement,
in the public data's literal format (the K&K dataset's `statements` field):

    leaf   ('telling-truth', i) "X is a knight" | ('lying', i) "X is a knave"
    depth2 ('not', leaf) | ('and', leaf, leaf) | ('or', leaf, leaf) | ('->', leaf, leaf) | ('<=>', leaf, leaf)

A puzzle is valid when exactly one knight/knave assignment makes every knight's statement true and every knave's
false. The solver checks all 2^n assignments at once: bit `a` of an integer stands for assignment `a` (person i is
a knight in it when bit i of `a` is set), so "person i is a knight" is one (2^n)-bit integer K_i, a statement's
truth is a few bitwise operations on those, and the assignments where everyone is consistent are

    consistent = AND_i  NOT(K_i XOR S_i)        (a knight says a true thing, a knave a false thing)

The sampler follows the public generator (checked against the public files' statistics) and rejects puzzles without
exactly one solution; 10,000 eight-person puzzles, text included, take about 1 s of one CPU core (bench_tasks.py).
A stable hash of the statement structure puts 1 in EVAL_BUCKETS structures in the eval split: training puzzles
never coincide with eval ones, whatever the seeds (tools/puzzles.py prints some).
"""
import ast
import functools
import hashlib
import json
import operator
import os
import random
import re

# ------------------------------------------------------------------------------------------- knights and knaves: solver
@functools.lru_cache(maxsize=None)
def _masks(n):
    """FULL = all 2^n assignments; K_i = the assignments in which person i is a knight (bit i of a set)."""
    size = 1 << n
    return (1 << size) - 1, [sum(1 << a for a in range(size) if a >> i & 1) for i in range(n)]

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
    if op in ("and", "or") and args:
        return functools.reduce(operator.and_ if op == "and" else operator.or_, args)
    if op == "->" and len(args) == 2:
        return (full ^ args[0]) | args[1]
    if op == "<=>" and len(args) == 2:
        return full ^ (args[0] ^ args[1])
    raise ValueError(f"bad K&K statement {stmt!r}: unknown operator {op!r} or wrong number of operands")

def _consistent(i, stmt, n):
    """The assignments in which person i's statement fits their role (kk_solve ANDs these over everyone)."""
    full, knights = _masks(n)
    return full ^ (knights[i] ^ _truth(stmt, n, full, knights))

def kk_solve(statements, n):
    """Every assignment (bools in person order, True = knight) under which each knight's statement is true and each
    knave's false, in increasing order as binary numbers (bit i: person i). `statements`: public literal or tuple."""
    if isinstance(statements, str):
        statements = ast.literal_eval(statements)
    if len(statements) != n:
        raise ValueError(f"kk_solve: {len(statements)} statements for {n} people; need one statement per person")
    consistent = functools.reduce(operator.and_, (_consistent(i, s, n) for i, s in enumerate(statements)), _masks(n)[0])
    return [tuple(bool(a >> i & 1) for i in range(n)) for a in range(1 << n) if consistent >> a & 1]

# -------------------------------------------------- knights and knaves: generator (records in the public data's format)

# The public files' 51 names and 18 sentence templates ({X} speaker, {S} statement text), with their quirks.
NAMES = ("Abigail Aiden Alexander Amelia Aria Aurora Ava Avery Benjamin Charlotte Chloe Daniel David Elizabeth Ella "
         "Emily Emma Ethan Evelyn Grace Harper Henry Isabella Jack Jackson Jacob James Joseph Liam Lily Logan Lucas "
         "Luke Mason Matthew Mia Michael Noah Oliver Olivia Owen Penelope Riley Samuel Scarlett Sebastian Sofia "
         "Sophia Victoria William Zoey").split()
TEMPLATES = ('"{S}" - {X}.', '{X} commented, "{S}".', '{X} was heard saying, "{S}".', "{X} expressed that {S}.",
             'In a statement by {X}: "{S}".', 'According to {X}, "{S}".', "In {X}'s words: \"{S}\".",
             '"{S}," {X} declared.', '{X} said, "{S}."', "{X} said that {S}.", '{X} asserted: "{S}".',
             'As {X} put it, "{S}".', "{X} told you that {S}.", '{X} noted, "{S}".', '"{S}," {X} claimed.',
             '{X} stated, "{S}".', '{X} remarked, "{S}".', '"{S}," {X} mentioned.')
QUIZ_HEAD = ("A very special island is inhabited only by knights and knaves. Knights always tell the truth, "
             "and knaves always lie. ")
QUIZ_TAIL = " So who is a knight and who is a knave?"
_BINARY = ("and", "or", "->", "<=>")
_CONNECTIVE = {"and": "and", "or": "or", "<=>": "if and only if"}
_ROLE = {"telling-truth": "knight", "lying": "knave"}
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
    a, b = _sample_leaf(rng, speaker, n), _sample_leaf(rng, speaker, n)
    while b == a:  # a binary statement's two leaves are distinct
        b = _sample_leaf(rng, speaker, n)
    return (_BINARY[kind - 2], a, b)

def _sample_statements(n, rng):
    """Statements with exactly one consistent assignment, and that assignment (rejection sampling)."""
    while True:
        statements, consistent = [], _masks(n)[0]
        for i in range(n):
            statements.append(_sample_statement(rng, i, n))
            consistent &= _consistent(i, statements[-1], n)
            if not consistent:  # already no solution: restart (same distribution as sample-all-then-reject)
                break
        if consistent and not consistent & (consistent - 1):  # exactly one bit set
            a = consistent.bit_length() - 1
            return tuple(statements), [bool(a >> i & 1) for i in range(n)]

def _statement_text(stmt, names):
    op = stmt[0]
    if op in _ROLE:
        return f"{names[stmt[1]]} is a {_ROLE[op]}"
    if op == "not":
        return f"{names[stmt[1][1]]} is not a {_ROLE[stmt[1][0]]}"
    a, b = (_statement_text(s, names) for s in stmt[1:])
    if op == "->":
        return f"If {a} then {b}"  # capital "If" even mid-sentence, as in the public data
    return f"{a} {_CONNECTIVE[op]} {b}"

def _join(items):
    return " and ".join(items) if len(items) == 2 else ", ".join(items[:-1]) + ", and " + items[-1]

def make_kk_puzzle(n, rng, index=0):
    """One n-person puzzle with a unique solution, as a record with the public data's fields.
    rng: a random.Random (the whole puzzle is a function of its state), or an int seed."""
    if not isinstance(n, int) or not 2 <= n <= MAX_PEOPLE:
        raise ValueError(f"make_kk_puzzle: n={n!r} people; use an int in [2, {MAX_PEOPLE}]")
    rng = rng if isinstance(rng, random.Random) else random.Random(rng)
    statements, solution = _sample_statements(n, rng)
    names = rng.sample(NAMES, n)
    said = [rng.choice(TEMPLATES).format(X=names[i], S=_statement_text(s, names)) for i, s in enumerate(statements)]
    roles = [f"{name} is a {'knight' if k else 'knave'}" for name, k in zip(names, solution)]
    return {"quiz": QUIZ_HEAD + f"You meet {n} inhabitants: {_join(names)}. " + " ".join(said) + QUIZ_TAIL,
            "names": names, "solution": solution, "solution_text": _join(roles) + ".",
            "solution_text_format": "\n".join(f"({i + 1}) {r}" for i, r in enumerate(roles)),
            "statements": repr(statements), "index": index}

EVAL_BUCKETS = 8  # 1 in 8 statement structures is reserved for evaluation

def _split_of(key):
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return "eval" if int.from_bytes(digest, "little") % EVAL_BUCKETS == 0 else "train"

def kk_split_of(n, statements):
    """"eval" or "train": the split a puzzle structure belongs to (stable across machines and Python runs)."""
    return _split_of(f"{n}:{statements if isinstance(statements, str) else repr(tuple(statements))}")

def _examples(task, levels, per_level, seed, *, split, make):
    """`per_level` Examples for each n in `levels`, level by level; make(n, rng, count) -> (its split, Example).
    split="eval" is the fixed held-out set (`seed` is ignored: eval with per_level=k is the first k of a fixed
    stream); split="train" draws from `seed` and keeps only what falls outside the eval split."""
    if split not in ("train", "eval"):
        raise ValueError(f"{task}_examples: split={split!r}; use 'train' or 'eval'")
    out = []
    for n in levels:
        rng = random.Random(f"rlad-{task}-eval-{n}" if split == "eval" else f"rlad-{task}-train-{seed}-{n}")
        count = 0
        while count < per_level:
            example_split, example = make(n, rng, count)
            if example_split == split:
                out.append(example)
                count += 1
    return out

def kk_example(record, id):
    """A K&K Example from a public-format record."""
    return {"task": "kk", "question": record["quiz"], "answer": record["solution_text_format"],
            "solution": [bool(s) for s in record["solution"]], "names": list(record["names"]),
            "level": f"PPL{len(record['names'])}", "id": id}

def kk_examples(people=range(2, 9), per_level=100, seed=0, split="train"):
    """Generated K&K Examples, `per_level` puzzles for each n in `people`, split by statement structure (see
    _examples). Structures can repeat within a split (PPL2 has only 399 distinct valid structures)."""
    def make(n, rng, count):
        record = make_kk_puzzle(n, rng, index=count)
        return kk_split_of(n, record["statements"]), kk_example(record, f"kk-{split}-PPL{n}-{count}")
    return _examples("kk", people, per_level, seed, split=split, make=make)

# -------------------------------------------------------- arithmetic: running sums mod 10, small enough to train on CPU
def make_arith_problem(n, rng):
    """(question, answer) for n single-digit operands joined by + and -; the answer is the running value mod 10 after
    each operation, a scratchpad of n - 1 digits: ("3 + 5 - 7 =", "8 1"). The response is that scratchpad, then the
    end-of-sequence token; rewards.arith_score pays 1 for exactly n - 1 digits whose last one is right."""
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"make_arith_problem: n={n!r} operands; use an int >= 2")
    rng = rng if isinstance(rng, random.Random) else random.Random(rng)
    value = rng.randrange(10)
    question, running = [str(value)], []
    for _ in range(n - 1):
        op, digit = rng.choice("+-"), rng.randrange(10)
        value = (value + digit if op == "+" else value - digit) % 10
        question += [op, str(digit)]
        running.append(str(value))
    return " ".join(question) + " =", " ".join(running)

def arith_examples(levels=range(2, 9), per_level=100, seed=0, split="train"):
    """Arithmetic Examples ({"task": "arith", "question", "answer", "level": "L{n}", "id"}), split as K&K's (see
    _examples) by a stable hash of the question (L2 has just 200 distinct problems)."""
    def make(n, rng, count):
        question, answer = make_arith_problem(n, rng)
        return _split_of(f"arith:{question}"), {"task": "arith", "question": question, "answer": answer,
                                                "level": f"L{n}", "id": f"arith-{split}-L{n}-{count}"}
    return _examples("arith", levels, per_level, seed, split=split, make=make)

# ----------------------------------------------------------------------- loaders: jsonl / parquet in the public formats
def read_rows(path):
    """(where, row) for each row of a .jsonl / .parquet file or hub dataset (hf:...); `where` is for error messages."""
    if path.startswith("hf:"):
        yield from _hub_rows(path)
    elif not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    elif path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq  # only needed here; a plain install does without it
        except ImportError as e:
            raise ImportError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from e
        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}, row {i}", row
    elif not path.endswith((".jsonl", ".json")):
        raise ValueError(f"{path}: unknown file type; use .jsonl (one JSON object per line) or .parquet")
    else:
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
    """(where, row) of a hub dataset hf:NAME[:CONFIG]:SPLIT (hf:openai/gsm8k:main:train; slices such as train[:1000]
    too) through the `datasets` library: from the Hub, or when unreachable (HF_HUB_OFFLINE=1) from the hub cache."""
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

def load_kk(path):
    """K&K Examples from a public-format file (fields quiz, names, solution; solution_text_format optional)."""
    out, stem = [], os.path.basename(path).split(".")[0]
    for where, row in read_rows(path):
        if missing := [field for field in ("quiz", "names", "solution") if field not in row]:
            raise ValueError(f"{where}: missing field {missing[0]!r} (K&K rows need quiz, names, solution)")
        names, solution = row["names"], row["solution"]
        if not isinstance(names, list) or not all(isinstance(x, str) for x in names):
            raise ValueError(f"{where}: field 'names' must be a list of strings, got {names!r}")
        if not (isinstance(solution, list) and len(solution) == len(names) and all(type(s) is bool for s in solution)):
            raise ValueError(f"{where}: field 'solution' must be {len(names)} booleans (one per name), "
                             f"got {solution!r}")
        text = row.get("solution_text_format") or "\n".join(
            f"({i + 1}) {x} is a {'knight' if k else 'knave'}" for i, (x, k) in enumerate(zip(names, solution)))
        out.append(kk_example({**row, "solution_text_format": text}, f"{stem}-{row.get('index', len(out))}"))
    return out

def extract_boxed(text):
    """Content of the LAST \\boxed{...} (or \\fbox{...}) in text, braces matched, in linear time; None when there
    is none. An unclosed last box gives None (no answer), not an earlier box."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox")) if isinstance(text, str) else -1
    if start < 0:
        return None
    rest = text[start:].removeprefix("\\boxed").removeprefix("\\fbox").lstrip(" ")
    if not rest.startswith("{"):  # "\boxed 5": the answer runs to the next space, dollar sign or newline
        return re.match(r"[^ $\n]*", rest).group(0) or None
    depth = 0
    for j, c in enumerate(rest):
        depth += (c == "{") - (c == "}")
        if depth == 0:  # the brace that closes rest[0]
            return rest[1:j]
    return None

def _field(row, key):
    """row[key], with dotted keys reaching into nested dicts ("reward_model.ground_truth")."""
    for part in key.split("."):
        row = row.get(part) if isinstance(row, dict) else None
    return row

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
        value = extract_boxed(value)
        if value is None:
            raise ValueError(f"{where}: field {key!r} has an unclosed \\boxed{{}}")
    value = value.strip().strip("$").strip()
    if not value:
        raise ValueError(f"{where}: field {key!r} is empty")
    return value

def load_math(path, question_key=None, answer_key=None, level=None):
    """Math Examples from .jsonl / .parquet. Fields found automatically unless given:
    question from question / problem / prompt (a string or a list of chat messages); answer from answer
    (a string, a number such as AMC's 97.0, or GSM8K's "... #### 42"), else solution (MATH: last \\boxed{}),
    else reward_model.ground_truth (verl-style files). Dotted keys reach into nested fields.
    level: the table column; default the file name up to its first "_" or "-" ("aime_2021_2024" -> "aime")."""
    if level is None and path.startswith("hf:"):  # a hub dataset's level is its name: hf:openai/gsm8k:main -> gsm8k
        level = path[3:].split(":")[0].split("/")[-1]
    if level is None:
        level = re.split(r"[._-]", os.path.basename(path))[0]
        if level.lower() in ("train", "test", "validation", "val", "dev"):  # HF layout: name/test-0000.parquet
            level = os.path.basename(os.path.dirname(os.path.abspath(path))) or level
    out = []
    for where, row in read_rows(path):
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
