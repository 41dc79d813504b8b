"""Paths that only a GPU takes in production, checked on CPU with the real parts:

- an engine shut down while asleep is woken first (vLLM's cumem allocator would unmap sleeping memory twice);
  on CPU, vLLM accepts sleep() / wake_up() and does nothing, so the calls themselves are observable;
- the full-vocabulary entropy runs only when the entropy bonus (or its control) needs it;
- train.py recognises vLLM's CPU build by the installed package, not by torch's "+cpu" version suffix (a CPU user
  whose torch came from the default index has a torch without the suffix).
"""
import os
import subprocess
import sys

import torch

import rollout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_shutdown_wakes_a_sleeping_engine_first(tiny_model_dir, monkeypatch):
    engine = rollout.VLLMEngine(tiny_model_dir, dtype="float32", max_model_len=128, seed=0, max_num_seqs=4,
                                kv_cache_memory_bytes=32 * 2**20)
    engine.sleep_mode = True  # what a GPU engine has: vLLM's real sleep / wake_up calls now run (no-ops on CPU)
    calls = []
    for obj, name in ((engine.llm, "sleep"), (engine.llm, "wake_up"), (engine.llm.llm_engine.engine_core, "shutdown")):
        real = getattr(obj, name)  # spies that call the real methods
        monkeypatch.setattr(obj, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    engine.sleep()
    assert engine.state == "asleep" and calls == ["sleep"]
    engine.shutdown()
    assert calls == ["sleep", "wake_up", "shutdown"] and engine.state == "closed"
    engine.shutdown()  # idempotent
    assert calls == ["sleep", "wake_up", "shutdown"]


def test_entropy_runs_only_when_the_bonus_needs_it(tiny_model_dir, monkeypatch):
    import kernels
    import policy
    import train
    _, _, device = train.setup_distributed()
    counted = []
    real = kernels.entropy
    monkeypatch.setattr(kernels, "entropy", lambda *a, **k: counted.append(1) or real(*a, **k))
    rows = [policy.Row(prompt=[5, 6, 7], response=[8, 9, 10], uid=i, adv=adv) for i, adv in enumerate([1.0, -1.0])]
    for ent_coef, ent_target, want_calls in ((0.0, 0.0, False), (0.01, 0.0, True), (0.0, 2.0, True)):
        cfg = train.Config(method="grpo", mini_batches=1, micro_batch_tokens=64, lr=1e-3, warmup_steps=0,
                           ent_target=ent_target)
        student = policy.load(tiny_model_dir, device, 1)
        opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr)
        m, counted[:] = policy.Metrics(), []
        train.update(train.Run(cfg=cfg, device=device, student=student, opt=opt, ent_coef=ent_coef), rows, 0, m)
        assert bool(counted) == want_calls, (ent_coef, ent_target, len(counted))
        entropy = m.reduce(device)["entropy"]
        assert 0 < entropy < torch.log(torch.tensor(float(student.lm.config.vocab_size))), entropy


def test_cpu_vllm_build_is_recognised_without_torch_cpu_suffix():
    code = ("import importlib.metadata as md\n"
            "real = md.version\n"
            "md.version = lambda name: '2.13.0' if name == 'torch' else real(name)  # torch from the default index\n"
            "import train, os\n"
            "print(os.environ.get('VLLM_ENABLE_V1_MULTIPROCESSING'), os.environ.get('TORCH_COMPILE_DISABLE'))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_ENABLE_V1_MULTIPROCESSING", "TORCH_COMPILE_DISABLE")}
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["0", "1"], p.stdout
