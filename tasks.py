"""tasks.py: what a task is, and the table of built-in ones. A task of your own (`--task module:name`,
docs/own_task.md) is written exactly like the built-ins below:

    examples(split, source) -> [Example]   dicts with "question", "id", "level" and whatever score() needs
    score(examples, responses) -> [{"reward", "correct", "format_ok"}]   one per response; must never raise
    prompt(example) -> str                  optional: the user message (default: example["question"])
    prefill = ""                            optional: the text the assistant turn starts with ("<think>")

`split` is "train" or "eval"; `source` (a Source) says where examples come from. A response is the whole assistant
turn, prefill included. TASKS maps names to tasks as rlad.METHODS maps names to objectives; nothing else in the
trainer looks at a task's name. Generators and loaders live in data.py, scorers in rewards.py.
"""
import importlib
import os
from dataclasses import dataclass
from types import SimpleNamespace

import data
import rewards

@dataclass
class Source:
    """Where a task's examples come from (train.py's and eval.py's flags)."""
    files: tuple = ()     # jsonl / parquet files or hf:NAME[:CONFIG]:SPLIT hub datasets; () = the task's generator
    levels: tuple = ()    # generated levels (K&K people, arith operands); () = the task's default
    per_level: int = None  # generated problems per level (default 100); split "eval" from files: at most this many
    seed: int = 0         # the training generator's seed (the eval split is a fixed stream)

def _from_files(loader, split, source):
    """Examples from every file; at split "eval" the first per_level of each level. Missing files fail first."""
    for path in source.files:
        if not path.startswith("hf:") and not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file")
    examples, count = [], {}
    for path in source.files:
        for ex in loader(path):
            count[ex["level"]] = count.get(ex["level"], 0) + 1
            if split == "train" or source.per_level is None or count[ex["level"]] <= source.per_level:
                examples.append(ex)
    return examples

# ----------------------------------------------------------------------------- the built-in tasks
KK_INSTRUCTION = (
    "Solve the logic puzzle below. First think it through step by step inside <think> </think> tags. Then give "
    "the final answer inside <answer> </answer> tags, stating the identity of every character, one per line:\n"
    "<answer>\n(1) Name is a knight\n(2) Name is a knave\n...\n</answer>\n\n"
)
MATH_INSTRUCTION = "\n\nPlease reason step by step, and put your final answer within \\boxed{}."

class KnightsAndKnaves:
    """Knights and Knaves (Logic-RL's reward): generated puzzles, or files in the public K&K format."""
    # The model starts inside its reasoning, and the format reward counts this tag (it is part of the response).
    prefill = "<think>"

    @staticmethod
    def prompt(example):
        return KK_INSTRUCTION + example["question"]

    @staticmethod
    def examples(split, source):
        if source.files:
            return _from_files(data.load_kk, split, source)
        people = source.levels or (range(3, 8) if split == "train" else range(2, 9))  # the paper: train PPL3-7
        return data.kk_examples(people, source.per_level or 100, source.seed, split)

    @staticmethod
    def score(examples, responses):
        return [rewards.kk_score(r, ex["solution"], ex["names"]) for ex, r in zip(examples, responses)]

class Math:
    """Competition math: the last \\boxed{} checked by math-verify. Files or hub datasets only."""
    prefill = ""  # thinking models open <think> by themselves; the reward reads only the last \boxed{}

    @staticmethod
    def prompt(example):
        return example["question"] + MATH_INSTRUCTION

    @staticmethod
    def examples(split, source):
        if not source.files:
            raise ValueError("task 'math' needs data files (jsonl or parquet, e.g. aime_2021_2024.jsonl) "
                             "or hub datasets (e.g. hf:openai/gsm8k:main:train)")
        return _from_files(data.load_math, split, source)

    @staticmethod
    def score(examples, responses):
        return rewards.math_scores(responses, [ex["answer"] for ex in examples])

class Arith:
    """Running sums mod 10 ("3 + 5 - 7 =" -> "8 1"), generated. The prompt is filled with "_ _" per operand short of
    `width` ("3 + 5 _ _ _ _ =" at 4): operand j and answer digit t sit at the same positions at every level."""
    prefill, width = "", 8
    prompt = staticmethod(lambda ex: ex["question"].replace("=", "_ _ " * (Arith.width - int(ex["level"][1:])) + "="))

    @staticmethod
    def examples(split, source):
        if source.files:
            raise ValueError("task 'arith' has no data files: drop them (its problems are generated)")
        return data.arith_examples(source.levels or range(2, 9), source.per_level or 100, source.seed, split)

    @staticmethod
    def score(examples, responses):
        return [rewards.arith_score(r, ex["answer"]) for ex, r in zip(examples, responses)]

TASKS = {"kk": KnightsAndKnaves, "math": Math, "arith": Arith}

# ----------------------------------------------------------------------------- loading a task, checked
def load(name_or_task):
    """The task `name_or_task`: a key of TASKS, `module:name`, or a task object. Returns a namespace with all four parts,
    its score checked on every call (a scorer that raises or miscounts stops the run with a line naming the task)."""
    task = TASKS.get(name_or_task) if isinstance(name_or_task, str) else name_or_task
    name = name_or_task if isinstance(name_or_task, str) else getattr(name_or_task, "__name__", "task")
    if task is None and ":" in name:
        module, _, attribute = name.partition(":")
        try:
            task = getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"--task {name}: cannot import {attribute} from {module} ({e}); the module must be "
                             "importable from the working directory or PYTHONPATH") from None
    if task is None:
        raise ValueError(f"--task {name!r}: use {', '.join(TASKS)}, or module:name for a task of your own "
                         "(docs/own_task.md)")
    if not (callable(getattr(task, "examples", None)) and callable(getattr(task, "score", None))):
        raise ValueError(f"--task {name}: needs examples(split, source) and score(examples, responses) "
                         "(docs/own_task.md)")
    def score(examples, responses):
        if len(examples) != len(responses):
            raise ValueError(f"score: {len(examples)} examples but {len(responses)} responses; pair them one to one")
        try:
            out = task.score(examples, responses)
        except Exception as e:  # the scorer's bug: stop with its name, not a traceback deep in the loop
            raise SystemExit(f"--task {name}: score() raised {type(e).__name__}: {e} (a scorer must never raise; "
                             "see docs/own_task.md)") from e
        if not isinstance(out, (list, tuple)) or len(out) != len(responses) or \
                not all(isinstance(s, dict) and {"reward", "correct", "format_ok"} <= set(s) for s in out):
            got = f"{len(out)} items" if isinstance(out, (list, tuple)) else type(out).__name__
            raise SystemExit(f"--task {name}: score() must return one {{reward, correct, format_ok}} dict per "
                             f"response ({len(responses)}), got {got}")
        return list(out)
    return SimpleNamespace(name=name, examples=task.examples, score=score, prefill=getattr(task, "prefill", ""),
                           prompt=getattr(task, "prompt", lambda example: example["question"]))

def target_sample(example: dict, prefill: str, tokenizer) -> dict:
    """The SFT baseline's one "sample" of an example, as an engine returns samples: its target text (a teacher's
    sample that eval.py --sft_out wrote), else its reference answer, after the prefill, then EOS."""
    text = (example.get("target") or example["answer"]).removeprefix(prefill)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {"response_ids": ids, "finish_reason": "stop"}

def score_rows(task, rows: list, example: dict, *, prefill: str, tokenizer):
    """Set text, reward, correct and format_ok of rows (policy.Row), responses to one example: each response is the
    whole assistant turn, the prompt's prefill + the decoded generated text, through the task's scorer."""
    texts = [prefill + tokenizer.decode(r.response, skip_special_tokens=True) for r in rows]
    for r, text, result in zip(rows, texts, task.score([example] * len(rows), texts)):
        r.text = text
        r.reward = float(result["reward"])
        r.correct = bool(result["correct"])
        r.format_ok = bool(result["format_ok"])

# ----------------------------------------------------------------------------- prompts
def prompt_ids(task, example, tokenizer):
    """(prompt_ids, prefill): the task's user message through the tokenizer's chat template (generation prompt
    added), then the prefill. A tokenizer without a chat template (the tiny arithmetic one) gets the bare message.
    The caller scores prefill + generated text. When the template itself ends with the prefill (DeepSeek-R1-
    Distill's ends "<｜Assistant｜><think>\\n"), it is not written twice: the returned prefill is the template's own.
    """
    message, prefill = task.prompt(example), task.prefill
    if not getattr(tokenizer, "chat_template", None):
        return tokenizer(message + prefill)["input_ids"], prefill
    # tokenize=False: in transformers 5 tokenize=True returns a BatchEncoding, not ids.
    text = tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                         add_generation_prompt=True)
    opened = text.rstrip()
    if prefill.strip() and opened.endswith(prefill.strip()):  # a second tag would fail the format reward
        return tokenizer(text, add_special_tokens=False)["input_ids"], text[opened.rfind(prefill.strip()):]
    return tokenizer(text + prefill, add_special_tokens=False)["input_ids"], prefill  # the template wrote any BOS

def load_examples(task, cfg, tokenizer, say=print):
    """train.py's data (its Config `cfg`): the training examples (the task's, or those of cfg.sft_data, a jsonl of
    examples with a "target", e.g. eval.py --sft_out's), their (prompt_ids, prefill), and the eval examples (none
    when cfg.eval_every is 0); examples whose prompt exceeds cfg.max_prompt_tokens are dropped, and `say` says how
    many: now, not at the first generate (the engine's max_model_len is prompt + response)."""
    levels = lambda text: tuple(int(x) for x in text.split(",") if x)  # noqa: E731  "3,4" -> (3, 4)
    files = lambda text: tuple(f for f in text.split(",") if f)  # noqa: E731  "a.jsonl,b.jsonl" -> (...)
    if cfg.sft_data:
        train = read_sft_data(cfg.sft_data)
    else:
        train = task.examples("train", Source(files(cfg.train_data), levels(cfg.train_levels), cfg.train_per_level,
                                              cfg.seed))
    evals = task.examples("eval", Source(files(cfg.eval_data), levels(cfg.eval_levels), cfg.eval_per_level)) \
        if cfg.eval_every else []
    out = []
    for what, examples in (("training", train), ("eval", evals)):
        kept, prompts = build_prompts(task, examples, tokenizer, cfg.max_prompt_tokens)
        if len(kept) < len(examples):
            say(f"dropped {len(examples) - len(kept)} of {len(examples)} {what} prompts over "
                f"{cfg.max_prompt_tokens} tokens (raise --max_prompt_tokens to keep them)")
        out.append((kept, prompts))
    return out[0][0], out[0][1], out[1][0]

def read_sft_data(path: str) -> list:
    """The examples of sft_data (eval.py --sft_out writes a jsonl; parquet and hf:... read alike, data.read_rows):
    each an object with its target text in "target" (or "answer") and the fields its task's prompt reads
    ("question" for the built-in tasks)."""
    examples = []
    for where, example in data.read_rows(path):
        if not (example.get("target") or example.get("answer")):
            raise ValueError(f"--sft_data {where}: no \"target\" (or \"answer\") text, as eval.py --sft_out writes")
        examples.append(example)
    return examples

def build_prompts(task, examples, tokenizer, max_prompt_tokens: int):
    """(kept examples, their (prompt_ids, prefill)): those whose prompt fits max_prompt_tokens."""
    prompts = []
    for i, example in enumerate(examples):
        try:
            prompts.append(prompt_ids(task, example, tokenizer))
        except KeyError as e:
            raise ValueError(f"example {i} has no field {e}, which the prompt of task {task.name!r} reads") from None
    keep = [i for i, (ids, _) in enumerate(prompts) if len(ids) <= max_prompt_tokens]
    return [examples[i] for i in keep], [prompts[i] for i in keep]
