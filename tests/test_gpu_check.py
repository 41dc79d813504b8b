"""benchmarks/gpu_check.py --dry-run as the first GPU session will run it: on an older torch, and killed at a limit.

The GPU machines it is written for run torch 2.11 (no vLLM), whose torch.distributed lacks names that 2.13 added.
TORCH_2_13_ONLY lists the ones this code uses: found by comparing the Python sources of the torch 2.11.0 wheel with
2.13.0 for every name gpu_check.py and the modules it imports mention. The run deletes them before the script
starts, so any use without a fallback fails here as it would there.

The JSON must be rewritten after every part: a run killed at the time limit then still returns what it finished.
The test reads the file each time a part's line appears (the script saves before it prints) and checks the part
is in it; a second run with --max-seconds 0 records every part after dist as skipped.
"""
import json
import os
import subprocess
import sys
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")
PARTS = ["dist", "logprobs", "memory_fit", "padding", "teacher", "sync", "adamw", "vllm"]
TORCH_2_13_ONLY = ["all_gather_single"]  # in torch.distributed; 2.11 has all_gather_into_tensor
# Remove the names from the package namespace only: 2.13's own all_gather_into_tensor calls its module's function.
WRAPPER = """import runpy, sys
import torch.distributed as dist
for name in sys.argv[1].split(","):
    delattr(dist, name)
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
ENV = dict(os.environ, OMP_NUM_THREADS="1", TORCH_COMPILE_DISABLE="1", PYTHONUNBUFFERED="1")


def run(json_path, *flags, timeout=120):
    """Run the dry run as torch 2.11 would see it; (return code, output, {part: its JSON entry when its line came})."""
    cmd = [sys.executable, "-c", WRAPPER, ",".join(TORCH_2_13_ONLY), SCRIPT, "--dry-run", "--json", json_path, *flags]
    p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timer = threading.Timer(timeout, p.kill)
    timer.start()
    seen, lines = {}, []
    try:
        for line in p.stdout:
            lines.append(line)
            name = line[1:].split("]", 1)[0] if line.startswith("[") else None
            if name in PARTS and ("part_seconds=" in line or "skipped=" in line):  # a part's own closing line
                with open(json_path) as f:
                    seen[name] = json.load(f)["parts"].get(name)
        p.wait()
    finally:
        timer.cancel()
    return p.returncode, "".join(lines), seen


def test_dry_run_without_torch_2_13_names_saves_after_every_part(tmp_path):
    path = str(tmp_path / "gpu_check.json")
    rc, out, seen = run(path)
    assert rc == 0, out[-3000:]
    assert list(seen) == PARTS, out[-3000:]  # each part was in the file when its line was printed
    with open(path) as f:
        final = json.load(f)
    assert final["finished"] is True and list(final["parts"]) == PARTS
    for name, res in final["parts"].items():
        assert "error" not in res and "skipped" not in res, (name, res)
        assert seen[name]["part_seconds"] == res["part_seconds"]
    presets = final["parts"]["memory_fit"]["presets"]
    assert presets and not [n for n, p in presets.items() if "error" in p], presets
    assert "Traceback" not in out, out[-3000:]


def test_parts_past_the_budget_are_recorded_as_skipped(tmp_path):
    path = str(tmp_path / "gpu_check.json")
    rc, out, seen = run(path, "--max-seconds", "0", "--parts", "logprobs,adamw")
    assert rc == 0, out[-3000:]
    with open(path) as f:
        final = json.load(f)
    assert final["parts"]["dist"]["all_reduce_ok"] is True  # dist always runs: the others need its process group
    assert [n for n, r in final["parts"].items() if "skipped" in r] == ["logprobs", "adamw"]
    assert list(seen) == ["dist", "logprobs", "adamw"]
