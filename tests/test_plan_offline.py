"""The memory plan offline. A new user's first command on a machine that has neither the models cached nor the hub:
`--plan true` on a GPU preset must end in one line that says how to get the models, not in transformers'
tracebacks. And the plan's model shapes for a family that names things its own way (GPT-2)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_plan_without_cache_or_hub_is_one_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "empty_cache"), HF_HOME=str(tmp_path),
               TORCH_COMPILE_DISABLE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, "train.py", "--config", "configs/kk_qwen3_0.6b_2k.toml", "--plan", "true",
                        "--run_dir", str(tmp_path / "run")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode != 0, out
    assert "Traceback" not in out, out
    lines = [line for line in out.splitlines() if "hf download Qwen/Qwen3-" in line]
    assert len(lines) == 1 and "HF_HUB_OFFLINE" in lines[0], out


def test_memory_plan_shapes_of_a_gpt2_model(tmp_path):
    """GPT-2 names its blocks `h` and has no intermediate_size: the plan still counts layers and the MLP width."""
    import preflight
    import tiny
    path = tiny.save_tiny(str(tmp_path / "gpt2"), tiny.make_arith_tokenizer(), family="gpt2", hidden_size=64,
                          num_layers=3, num_heads=2)
    shapes = preflight.shapes(path)
    assert shapes["layers"] == 3 and shapes["intermediate"] == 256 and shapes["hidden"] == 64
    assert shapes["params"] == shapes["root"] + 3 * shapes["layer"] and shapes["vocab"] == 18


def test_the_download_command_named_in_messages_exists_in_the_installed_package():
    """Messages tell users to run preflight.DOWNLOAD; the installed huggingface_hub must ship it (2.x has `hf`, not
    `huggingface-cli`), with the --local-dir option that eval.py's message names."""
    import importlib.metadata
    import shutil
    import preflight
    command, verb = preflight.DOWNLOAD.split()
    scripts = {e.name for e in importlib.metadata.entry_points(group="console_scripts")}
    assert command in scripts and "huggingface-cli" not in scripts
    exe = shutil.which(command, path=os.path.dirname(sys.executable))
    p = subprocess.run([exe, verb, "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "--local-dir" in p.stdout and "REPO_ID" in p.stdout, p.stdout + p.stderr
