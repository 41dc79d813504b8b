"""Hub datasets as data sources (hf:NAME[:CONFIG]:SPLIT), without network: datasets laid out in a local Hugging Face
hub cache exactly as huggingface_hub leaves a downloaded dataset repo, loaded with HF_HUB_OFFLINE=1.

The cache (HF_HUB_CACHE=<tmp>/hub) holds datasets--ORG--NAME/ with blobs/ (content named by its sha256),
snapshots/<40-hex revision>/ of relative symlinks into blobs/, and refs/main naming the revision. The files are in
the hub's parquet layout, as `push_to_hub` writes it and as openai/gsm8k has it:
  - named configs: README.md whose YAML `configs:` maps each config's splits to files, main/train-00000-of-00001.parquet
    and main/test-00000-of-00001.parquet (config "main");
  - the default config: data/train-00000-of-00001.parquet, data/test-..., no README needed (datasets' default
    data-file patterns find the split in the file name).
datasets 5.x, offline, only reuses what it prepared itself in HF_DATASETS_CACHE; data._rows then falls back to the hub
cache's snapshot, so HF_DATASETS_CACHE is a fresh, empty directory here and nothing can come from elsewhere.

The loads run in one subprocess, because huggingface_hub and datasets read HF_HUB_OFFLINE / HF_HUB_CACHE when they are
imported; each test checks its part of that run's results.
"""
import hashlib
import io
import json
import os
import subprocess
import sys

import pytest
from types import SimpleNamespace

import data

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("datasets")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KK_FIXTURE = os.path.join(ROOT, "tests", "fixtures", "kk_public_test.jsonl")  # 4 public rows for each of 3..7 people
KK_ROWS = [json.loads(line) for line in open(KK_FIXTURE)]

GSM_TRAIN = [  # GSM8K's own fields: the answer is a worked solution ending "#### N"
    {"question": "Tom has 40 apples and buys 2 more. How many apples does he have?",
     "answer": "He has 40 + 2 = <<40+2=42>>42 apples.\n#### 42"},
    {"question": "A box holds 6 eggs. How many eggs are in 3 boxes?", "answer": "3 * 6 = 18\n#### 18"},
]
GSM_TEST = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(1, 4)]
GSM_README = """---
configs:
- config_name: main
  data_files:
  - split: train
    path: main/train-*
  - split: test
    path: main/test-*
- config_name: socratic
  data_files:
  - split: train
    path: socratic/train-*
---
# gsm8k-like test dataset (the socratic config's files are not in the cache, as after loading only "main")
"""
MATH_TRAIN = [  # MATH-style: problem and a worked solution whose last \boxed{} is the answer
    {"problem": "Compute $\\frac{2}{4}$ in lowest terms.", "solution": "Divide by 2: $\\boxed{\\frac{1}{2}}$.",
     "unique_id": "test/prealgebra/1.json"},
    {"problem": "What is $3^2$?", "solution": "$3^2 = 9$, so the answer is $\\boxed{9}$.",
     "unique_id": "test/algebra/2.json"},
]


def _parquet(rows):
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def lay_out_hub_dataset(cache, repo_id, files):
    """files {path in repo: bytes} into cache/datasets--ORG--NAME the way huggingface_hub stores a downloaded repo."""
    repo = os.path.join(cache, "datasets--" + repo_id.replace("/", "--"))
    revision = hashlib.sha1(repo_id.encode()).hexdigest()  # any 40-hex commit id
    snapshot = os.path.join(repo, "snapshots", revision)
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    for name, content in files.items():
        blob = os.path.join(repo, "blobs", hashlib.sha256(content).hexdigest())
        with open(blob, "wb") as f:
            f.write(content)
        link = os.path.join(snapshot, name)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)  # ../../blobs/<sha256>, as the hub does
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(revision)
    return snapshot


# What the subprocess loads: name -> (task, sources, split, per_level).
CASES = {
    "gsm_train": ("math", ["hf:testorg/gsm8k:main:train"], "train", None),
    "gsm_eval": ("math", ["hf:testorg/gsm8k:main:test"], "eval", 2),
    "gsm_slice": ("math", ["hf:testorg/gsm8k:main:test[:1]"], "train", None),
    "math_default": ("math", ["hf:testorg/competition_math:train"], "train", None),
    "mixed_eval": ("math", ["hf:testorg/gsm8k:main:test", "{tmp}/aime_2024.jsonl", "hf:testorg/competition_math:train"],
                   "eval", 2),
    "kk_train": ("kk", ["hf:testorg/kk-logic:train"], "train", None),
    "kk_eval": ("kk", ["hf:testorg/kk-logic:test"], "eval", 1),
    "missing_split": ("math", ["hf:testorg/gsm8k:main:validation"], "eval", None),
    "missing_config_files": ("math", ["hf:testorg/gsm8k:socratic:train"], "train", None),
    "unknown_config": ("math", ["hf:testorg/gsm8k:nosuch:train"], "train", None),
    "missing_dataset": ("math", ["hf:testorg/no-such-dataset:train"], "train", None),
    "missing_field": ("math", ["hf:testorg/broken:train"], "train", None),
    "kk_missing_field": ("kk", ["hf:testorg/gsm8k:main:train"], "train", None),
    "no_split": ("math", ["hf:testorg/gsm8k"], "train", None),
}

SCRIPT = r"""
import json, sys
import data, tasks
load = lambda task, files, split="train", per_level=None: tasks.load(task).examples(split, tasks.Source(tuple(files), per_level=per_level))
cases, out = json.loads(sys.argv[1]), {}
for name, (task, sources, split, per_level) in cases.items():
    try:
        out[name] = {"examples": load(task, sources, split, per_level)}
    except Exception as e:
        out[name] = {"error": type(e).__name__, "message": str(e)}
sys.modules["datasets"] = None  # as if datasets were not installed
try:
    load("math", ["hf:testorg/gsm8k:main:train"])
except ImportError as e:
    out["no_datasets"] = {"error": "ImportError", "message": str(e)}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def hub_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hub_data")
    cache = str(tmp / "hub")
    lay_out_hub_dataset(cache, "testorg/gsm8k", {
        "README.md": GSM_README.encode(),
        "main/train-00000-of-00001.parquet": _parquet(GSM_TRAIN),
        "main/test-00000-of-00001.parquet": _parquet(GSM_TEST)})
    lay_out_hub_dataset(cache, "testorg/competition_math", {"data/train-00000-of-00001.parquet": _parquet(MATH_TRAIN)})
    lay_out_hub_dataset(cache, "testorg/kk-logic", {
        "data/train-00000-of-00001.parquet": _parquet(KK_ROWS[:6]),
        "data/test-00000-of-00001.parquet": _parquet(KK_ROWS)})
    lay_out_hub_dataset(cache, "testorg/broken", {
        "data/train-00000-of-00001.parquet": _parquet([{"question": "1 + 1?", "answer": "2"},
                                                       {"question": "2 + 2?", "answer": None}])})
    with open(tmp / "aime_2024.jsonl", "w") as f:
        for i in range(3):
            f.write(json.dumps({"problem": f"AIME problem {i}", "answer": 100 + i}) + "\n")
    cases = {k: (t, [s.format(tmp=tmp) for s in src], sp, n) for k, (t, src, sp, n) in CASES.items()}
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=cache, HF_HOME=str(tmp / "hf_home"),
               HF_DATASETS_CACHE=str(tmp / "datasets_cache"),  # fresh: nothing prepared earlier is reused
               HF_DATASETS_DISABLE_PROGRESS_BARS="1", HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9",
               PYTHONPATH=ROOT)
    run = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(cases)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    results["_cache"] = cache
    return results


def _examples(results, name):
    assert "examples" in results[name], results[name]
    return results[name]["examples"]


def _error(results, name, kind):
    got = results[name]
    assert got.get("error") == kind, got
    assert "\n" not in got["message"], got["message"]  # one line
    return got["message"]


def test_gsm8k_named_config_train_split(hub_results):
    exs = _examples(hub_results, "gsm_train")
    assert [(e["question"], e["answer"]) for e in exs] == [(GSM_TRAIN[0]["question"], "42"),
                                                           (GSM_TRAIN[1]["question"], "18")]
    assert {e["task"] for e in exs} == {"math"}
    assert {e["level"] for e in exs} == {"gsm8k"}  # the dataset name's last part, not "train"
    assert [e["id"] for e in exs] == ["gsm8k-0", "gsm8k-1"]


def test_eval_split_per_level_and_slice(hub_results):
    exs = _examples(hub_results, "gsm_eval")
    assert [e["answer"] for e in exs] == ["2", "4"]  # the first per_level=2 of 3
    assert _examples(hub_results, "gsm_slice")[0]["question"] == GSM_TEST[0]["question"]  # test[:1]
    assert len(_examples(hub_results, "gsm_slice")) == 1


def test_default_config_boxed_solution(hub_results):
    exs = _examples(hub_results, "math_default")
    assert [e["answer"] for e in exs] == ["\\frac{1}{2}", "9"]
    assert exs[0]["question"] == MATH_TRAIN[0]["problem"]
    assert {e["level"] for e in exs} == {"competition_math"}  # the whole last part, not cut at "_"
    assert exs[1]["id"] == "competition_math-test/algebra/2.json"  # unique_id, as for files


def test_mixed_files_and_hub_sources(hub_results):
    exs = _examples(hub_results, "mixed_eval")
    assert [e["level"] for e in exs] == ["gsm8k", "gsm8k", "aime", "aime", "competition_math", "competition_math"]
    assert [e["answer"] for e in exs if e["level"] == "aime"] == ["100", "101"]


def test_kk_hub_dataset_matches_file_loader(hub_results):
    from_file = data.load_kk(KK_FIXTURE)
    keys = ("task", "question", "answer", "solution", "names", "level")
    train = _examples(hub_results, "kk_train")
    assert [{k: e[k] for k in keys} for e in train] == [{k: e[k] for k in keys} for e in from_file[:6]]
    evals = _examples(hub_results, "kk_eval")  # per_level=1: the first puzzle of each of PPL3..PPL7
    assert [e["level"] for e in evals] == ["PPL3", "PPL4", "PPL5", "PPL6", "PPL7"]
    first = {}
    for e in from_file:
        first.setdefault(e["level"], e)
    assert [{k: e[k] for k in keys} for e in evals] == [{k: e[k] for k in keys} for e in first.values()]


def test_missing_split_is_one_line(hub_results):
    msg = _error(hub_results, "missing_split", "ValueError")
    assert msg.startswith("hf:testorg/gsm8k:main:validation: ")
    assert "validation" in msg and "'train', 'test'" in msg  # what to use instead
    msg = _error(hub_results, "missing_config_files", "ValueError")  # listed in README.md, its files not cached
    assert msg.startswith("hf:testorg/gsm8k:socratic:train: ")
    assert "hf download testorg/gsm8k --repo-type dataset" in msg
    msg = _error(hub_results, "unknown_config", "ValueError")
    assert msg.startswith("hf:testorg/gsm8k:nosuch:train: ") and "'main', 'socratic'" in msg
    msg = _error(hub_results, "no_split", "ValueError")
    assert msg.startswith("hf:testorg/gsm8k: ") and "hf:NAME[:CONFIG]:SPLIT" in msg


def test_missing_dataset_is_one_line(hub_results):
    msg = _error(hub_results, "missing_dataset", "FileNotFoundError")
    assert msg.startswith("hf:testorg/no-such-dataset:train: ")
    assert hub_results["_cache"] in msg and "hf download testorg/no-such-dataset --repo-type dataset" in msg


def test_missing_field_names_the_row(hub_results):
    msg = _error(hub_results, "missing_field", "ValueError")
    assert msg.startswith("hf:testorg/broken split train, row 1: missing answer field"), msg
    msg = _error(hub_results, "kk_missing_field", "ValueError")
    assert msg.startswith("hf:testorg/gsm8k config main split train, row 0: missing field 'quiz'"), msg


def test_datasets_missing_names_the_fix(hub_results):
    msg = _error(hub_results, "no_datasets", "ImportError")
    assert msg.startswith("hf:testorg/gsm8k:main:train: ") and "pip install datasets" in msg


def test_hub_sources_skip_the_file_check_but_files_do_not():
    import tasks
    with pytest.raises(FileNotFoundError, match="nofile.jsonl: no such file"):
        tasks.load("math").examples("train", tasks.Source(("hf:testorg/gsm8k:main:train", "nofile.jsonl")))


def test_datasets_imported_only_for_hub_sources(tmp_path):
    path = tmp_path / "aime.jsonl"
    path.write_text(json.dumps({"problem": "p", "answer": 1}) + "\n")
    code = ("import sys, tasks; tasks.load('math').examples('train', tasks.Source((sys.argv[1],))); "
            "tasks.load('kk').examples('eval', tasks.Source(per_level=1)); "
            "assert 'datasets' not in sys.modules, 'datasets imported without an hf: source'")
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": ROOT})


def test_train_passes_hub_sources_through(monkeypatch, tmp_path):
    import tasks
    import train
    aime = tmp_path / "aime.jsonl"
    aime.write_text("")
    cfg = train.parse_config(["--task", "math", "--train_data", f"hf:openai/gsm8k:main:train,{aime}",
                              "--eval_data", "hf:Skywork/Skywork-OR1-RL-Data:math"])
    assert cfg.train_data == f"hf:openai/gsm8k:main:train,{aime}"
    calls = []
    monkeypatch.setattr(data, "load_math", lambda path, **kw: calls.append(path) or [])
    run = SimpleNamespace(cfg=cfg, task=tasks.load("math"), tokenizer=None)
    with pytest.raises(SystemExit, match="empty training set"):
        train.load_data(run)
    assert calls == ["hf:openai/gsm8k:main:train", str(aime), "hf:Skywork/Skywork-OR1-RL-Data:math"]
