"""scripts/launch.sh, the per-node command of scripts/slurm.sbatch, in a real two-"node" launch on this machine.

Two launch.sh processes (NNODES=2, NODE_RANK 0 and 1, one rank each, c10d rendezvous on localhost, one RUN_DIR)
run the tiny preset for 2 steps; then the same command with --max_steps 4 is what a requeued SLURM job runs: it
must resume from step 2 (launch.sh always passes --resume true) and end at step 4. One rank per "node" makes
LOCAL_WORLD_SIZE 1, so train.py's default layout is HSDP, 2 replicas x 1 shard.

scripts/slurm.sbatch itself runs with stand-ins for srun, scancel and scontrol: USR1 (its time-limit warning)
must reach train.py as SIGTERM, which writes a checkpoint and exits, and the script then requeues the job.
"""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "scripts", "launch.sh")
TIMEOUT_S = 300
ENV = dict(os.environ, PYTHON=sys.executable, PYTHONUNBUFFERED="1", TORCH_COMPILE_DISABLE="1",
           VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS="1")
for _key in [k for k in ENV if k.startswith("SLURM_") or k in ("NNODES", "NODE_RANK", "NPROC_PER_NODE", "RUN_DIR",
                                                              "RDZV_HOST", "RDZV_PORT")]:
    del ENV[_key]  # a test run inside a SLURM job, or a shell set up for launch.sh: only the test's own values
FLAGS = ["--config", os.path.join(ROOT, "configs", "tiny_cpu.toml"), "--save_every", "2", "--eval_every", "0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def kill_tree(pid):
    """SIGKILL pid's process group and every descendant: torchrun starts each rank in a session of its own."""
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    todo, found = [pid], []
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    for target, kill in [(pid, os.killpg)] + [(p, os.kill) for p in found]:
        with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
            kill(target, signal.SIGKILL)


def tail(path, n=3000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-n:]


def launch_two_nodes(run_dir, logs, max_steps):
    """Both "nodes" of one launch; returns their outputs. Kills both process groups past TIMEOUT_S."""
    port = free_port()
    procs, paths = [], []
    for node in (0, 1):
        env = dict(ENV, NNODES="2", NODE_RANK=str(node), NPROC_PER_NODE="1", RDZV_HOST="localhost",
                   RDZV_PORT=str(port), RUN_DIR=str(run_dir))
        paths.append(str(logs / f"node{node}_steps{max_steps}.log"))
        with open(paths[-1], "w") as out:
            procs.append(subprocess.Popen(["bash", LAUNCH] + FLAGS + ["--max_steps", str(max_steps)], cwd=ROOT,
                                          env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for p in procs:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for p in procs:
            kill_tree(p.pid)  # launch.sh's torchrun and its train.py rank
            p.wait()
        raise AssertionError(f"two-node launch (max_steps {max_steps}) still running after {TIMEOUT_S} s\n"
                             + "\n".join(f"--- node {i}:\n{tail(path)}" for i, path in enumerate(paths)))
    outs = [tail(path, 10**7) for path in paths]
    codes = [p.returncode for p in procs]
    assert codes == [0, 0], f"exit codes {codes}\n" + "\n".join(f"--- node {i}:\n{o[-3000:]}"
                                                                   for i, o in enumerate(outs))
    return outs


def steps(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def test_two_node_launch_then_requeue_resumes(tmp_path):
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    ckpts = run_dir / "checkpoints"

    out = "\n".join(launch_two_nodes(run_dir, logs, max_steps=2))  # rank 0 may be on either "node"
    assert "--resume true" in out and "--rdzv_backend c10d" in out, out[-3000:]
    assert "resumed from" not in out, out[-3000:]  # --resume true without a checkpoint: a fresh start
    assert "world 2" in out, out[-3000:]  # one process group across both "nodes"
    assert steps(run_dir) == [1, 2]
    assert os.path.isfile(ckpts / "step_000002" / "trainer_state.pt")

    out = "\n".join(launch_two_nodes(run_dir, logs, max_steps=4))  # the requeued job: the same command
    assert "resumed from" in out and "at step 2" in out, out[-3000:]
    assert steps(run_dir) == [1, 2, 3, 4]
    assert os.path.isfile(ckpts / "step_000004" / "trainer_state.pt")
    assert os.path.isfile(ckpts / "step_000004" / "model.safetensors")


# Stand-ins: srun runs its command as a step in its own process group; scancel --signal signals that group (as
# SLURM signals every process of a step); scontrol names the host and records the requeue.
FAKE_SLURM = {
    "srun": 'while [[ $1 == --* ]]; do shift; done\nsetsid "$@" &\necho $! > "$FAKE/step.pid"\nwait $!\n',
    "scancel": 'echo "scancel $*" >> "$FAKE/calls.log"\nkill -TERM -- -"$(cat "$FAKE/step.pid")"\n',
    "scontrol": 'echo "scontrol $*" >> "$FAKE/calls.log"\nif [ "$1" = show ]; then echo localhost; fi\n',
}


def test_sbatch_checkpoints_and_requeues_at_the_time_limit_signal(tmp_path):
    fake, run_dir = tmp_path / "bin", tmp_path / "run"
    fake.mkdir()
    for name, body in FAKE_SLURM.items():
        (fake / name).write_text("#!/usr/bin/env bash\n" + body)
        (fake / name).chmod(0o755)
    env = dict(ENV, FAKE=str(fake), PATH=f"{fake}:{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_JOB_NAME="rlad",
               SLURM_SUBMIT_DIR=ROOT, SLURM_NNODES="1", SLURM_NODEID="0", SLURM_JOB_NODELIST="localhost",
               NPROC_PER_NODE="1", RDZV_PORT=str(free_port()), RUN_DIR=str(run_dir))
    log = str(tmp_path / "batch.log")
    cmd = ["bash", os.path.join(ROOT, "scripts", "slurm.sbatch"), "--config", FLAGS[1], "--max_steps", "200",
           "--save_every", "0", "--eval_every", "0"]
    with open(log, "w") as out:
        batch = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + TIMEOUT_S
    try:
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):  # training is under way
            assert batch.poll() is None, f"slurm.sbatch ended early\n{tail(log)}"
            assert time.monotonic() < deadline, f"no 2 steps after {TIMEOUT_S} s\n{tail(log)}"
            time.sleep(0.5)
        batch.send_signal(signal.SIGUSR1)  # --signal=B:USR1@300: only the batch shell gets it
        batch.wait(timeout=max(1.0, deadline - time.monotonic()))
    except (subprocess.TimeoutExpired, AssertionError) as e:
        kill_tree(batch.pid)  # the batch shell, the stand-in srun, its step: torchrun and train.py
        batch.wait()
        raise AssertionError(f"slurm.sbatch: {e}\n{tail(log)}") from None
    out = tail(log, 10**7)
    calls = (fake / "calls.log").read_text()
    assert "scancel --signal=TERM 4242" in calls and "scontrol requeue 4242" in calls, calls + out[-3000:]
    assert "SIGTERM: checkpoint written at step" in out, out[-3000:]
    saved = sorted(os.listdir(run_dir / "checkpoints"))
    assert len(saved) == 1 and saved[0].startswith("step_"), saved
    last = int(saved[0][len("step_"):])
    assert 2 <= last < 200 and steps(run_dir) == list(range(1, last + 1)), (saved, steps(run_dir))
