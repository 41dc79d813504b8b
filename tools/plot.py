"""tools/plot.py: training curves (reward, accuracy, eval accuracy vs step) of runs, from their metrics.jsonl.

    python tools/plot.py runs/grpo runs/kdrl runs/rlad --out curves.png
"""
import argparse
import json
import os

def read_metrics(run_dir: str) -> list:
    """RUN_DIR/metrics.jsonl as a list of dicts sorted by step; after a resume the last line of a step wins."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: pass run directories written by train.py")
    with open(path) as f:
        lines = [ln for ln in f.read().splitlines() if ln.strip()]
    by_step = {}
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # a line still being written by a live run
                continue
            raise ValueError(f"{path}, line {i + 1}: not JSON: {line[:80]!r}")
        if "step" not in rec:
            raise ValueError(f"{path}, line {i + 1}: no 'step' field")
        by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def plot(run_dirs, out: str = "curves.png") -> str:
    """Reward, accuracy (and eval accuracy when logged) vs step, one line per run, on one figure."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    runs = {}
    for d in run_dirs:
        label = os.path.basename(os.path.normpath(d))
        runs[label if label not in runs else d] = read_metrics(d)
    keys = ["reward", "accuracy"]
    if any("eval_accuracy" in r for recs in runs.values() for r in recs):
        keys.append("eval_accuracy")
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, recs in runs.items():
            pts = [(r["step"], r[key]) for r in recs if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), label=label, marker="o" if key == "eval_accuracy" else None, markersize=3)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="tools/plot.py", description="reward / accuracy vs step for runs")
    p.add_argument("run_dirs", nargs="+", help="run directories holding metrics.jsonl")
    p.add_argument("--out", default="curves.png")
    a = p.parse_args(argv)
    try:
        print(plot(a.run_dirs, a.out))
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))


if __name__ == "__main__":
    main()
