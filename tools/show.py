"""tools/show.py: one self-contained HTML page of a step's logged responses (RUN_DIR/samples/step_NNNNNN.jsonl,
written by train.py every `log_samples_every` steps), token by token: each token coloured by logp_S - logp_T,
underlined by its response's advantage and the teacher's relation to it, struck through where the clip removed
its gradient. A viewer: no run imports it.

    python tools/show.py runs/rlad              # the newest logged step -> runs/rlad/samples/step_NNNNNN.html
    python tools/show.py runs/rlad --step 12 --out page.html
"""
import argparse
import html
import json
import os
import re

# RLAD's selective imitation (rlad.py's table: TRRD, alpha 0.5, first PPO epoch): (sign of A, teacher) -> effect
IMITATION = {(1, "prefers"): "pushed up", (-1, "prefers"): "clipped: not pushed down",
             (1, "rejects"): "clipped: no credit", (-1, "rejects"): "pushed down"}
CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h1{font-size:20px;margin:0 0 .2em} h2{font-size:16px;margin:1.2em 0 .3em} table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}
.legend{background:#fafafa;border:1px solid #ddd;padding:.2em 1em .6em;font-size:13px}
.scale{display:inline-block;width:240px;height:12px;vertical-align:middle;
background:linear-gradient(90deg,#6494c5,#fff,#c66b76)}
.prompt{white-space:pre-wrap;overflow-wrap:anywhere;max-height:9em;overflow:auto;background:#f3f3f3;
padding:.4em .6em;font:12px/1.4 ui-monospace,monospace} .resp{display:flex;gap:1em;border-top:1px solid #ddd}
.meta{flex:0 0 21em;font-size:12px;padding:.4em 0} .meta b{font-size:13px}
.body{flex:1;min-width:0;font:13px/2.1 ui-monospace,monospace;padding:.2em 0}
.t{white-space:pre-wrap;overflow-wrap:anywhere;border-bottom:1px solid #999} .pos{border-bottom-color:#1a9850}
.neg{border-bottom-color:#8e44ad} .prefers{border-bottom-width:3px}
.rejects{border-bottom-style:double;border-bottom-width:4px}
.t.nil{border-bottom:1px dotted #999} .clip{text-decoration:line-through;outline:1px dashed #333}"""
LEGEND = """<div class=legend><h2>Legend</h2><p>Background: <b>gap = logp_S - logp_T</b> per token, clamped to
[-3, 3]: <span class=scale></span> blue = the teacher prefers the token (gives it more probability), white = near 0,
red = the teacher rejects it. Relation with the TRRD clamp c: prefers when gap &le; -c, rejects when gap &ge; c,
agrees otherwise. Hover a token for logp_S, logp_T, gap, regime and clip.</p><p>Underline: colour = the response's
advantage (<span class="t pos">green</span> A &gt; 0 rewarded, <span class="t neg">purple</span> A &lt; 0
penalised, <span class="t nil">dotted grey</span> A = 0 no signal); width = the teacher's relation
(<span class="t pos prefers">thick: prefers</span>, <span class="t pos rejects">double: rejects</span>,
<span class="t pos">thin: agrees</span>). <span class="t clip">struck through, dashed box</span> = clipped: the
PPO/TRRD clip removed this token's gradient.</p>{table}
<p>Methods without a teacher (teacher_logp null, e.g. grpo): no colour, the regime is rewarded / penalised only.
For other methods with a teacher (kdrl, distill) the colour shows where the KD term pulls; the table is RLAD's.</p>
</div>"""


def _imitation_table() -> str:
    """rlad.py's selective-imitation table, drawn from IMITATION with the marks the tokens get."""
    cell = lambda sign, rel: f'<td><span class="t {"pos" if sign > 0 else "neg"} {rel}'\
        f'{" clip" if "clipped" in IMITATION[sign, rel] else ""}">{IMITATION[sign, rel]}</span></td>'  # noqa: E731
    rows = "".join(f"<tr><td>teacher {rel} it</td>{cell(1, rel)}{cell(-1, rel)}</tr>" for rel in ("prefers", "rejects"))
    return ("<table><tr><th>RLAD (TRRD, alpha 0.5, first PPO epoch)</th><th>A &gt; 0 (rewarded)</th><th>A &lt; 0 "
            f"(penalised)</th></tr>{rows}<tr><td>teacher agrees</td><td colspan=2>ordinary PPO step</td></tr><tr>"
            "<td>A = 0</td><td colspan=2>no gradient: the teacher acts only through the advantage</td></tr></table>")


def _gap_colour(gap):
    """Diverging background for gap = logp_S - logp_T clamped to [-3, 3]: blue < 0 < red, at most 70% strong."""
    t = max(-3.0, min(3.0, gap)) / 3 * 0.7
    hue = (33, 102, 172) if t < 0 else (178, 24, 43)
    return "#" + "".join(f"{round(255 - abs(t) * (255 - h)):02x}" for h in hue)


def _effect(method, sign, rel):
    """What the update does to a token: rlad.py's selective-imitation table for rlad, else just A's sign."""
    if method != "rlad":
        return "PPO step" if sign else "no policy gradient"
    return IMITATION.get((sign, rel), "ordinary PPO step") if sign else "no gradient"


def _response_html(s, method):
    """One response: its tokens coloured, marked and with tooltips; reward, advantage, counts beside them."""
    toks, lps, lts, n = s["tokens"], s["student_logp"], s.get("teacher_logp"), len(s["tokens"])
    rel = s.get("teacher")  # prefers / rejects / agrees, as eval.write_samples logged it
    clipped, ids = s.get("clipped") or [False] * n, s.get("token_ids") or [None] * n
    for name, v in (("student_logp", lps), ("teacher_logp", lts), ("teacher", rel), ("clipped", clipped)):
        if v is not None and len(v) != n:
            raise ValueError(f"a response has {n} tokens but {len(v)} {name} values")
    for name in ("token_reward", "token_advantage", "topk_kl"):
        if s.get(name) is not None and len(s[name]) != n:
            raise ValueError(f"a response has {n} tokens but {len(s[name])} {name} values")
    sign = (s["advantage"] > 0) - (s["advantage"] < 0)
    where, cls = {1: ("rewarded", "pos"), -1: ("penalised", "neg"), 0: ("no signal", "nil")}[sign]
    spans, counts = [], {r: 0 for r in ("prefers", "rejects", "agrees")} if rel else {}
    for i, tok in enumerate(toks):
        r = rel[i] if rel else None
        tip = f"{json.dumps(tok)} id {ids[i]}\nlogp_S {lps[i]:.3f}" + (
            f"  logp_T {lts[i]:.3f}  gap {lps[i] - lts[i]:+.3f}" if lts else "  (no teacher)")
        if s.get("token_advantage") is not None:  # TOP-D: every token has an advantage of its own
            token_sign = (s["token_advantage"][i] > 0) - (s["token_advantage"][i] < 0)
            tip += f"\nregime: {'pushed up' if token_sign > 0 else 'pushed down' if token_sign < 0 else 'no gradient'}"
        else:
            tip += f"\nregime: {where}" + (f" x teacher {r}" if r else "") + f" ({_effect(method, sign, r)})"
        tip += f"\nclipped: {'yes' if clipped[i] else 'no'}"
        if s.get("token_reward") is not None:  # TOP-D: the token's own reward and advantage (its sign is the push)
            tip += f"\nTOP-D reward {s['token_reward'][i]:+.3f}  advantage {s['token_advantage'][i]:+.3f}"
        if s.get("topk_kl") is not None:  # topk_kd: how far the student's top-k is from the teacher's here
            tip += f"\ntop-k KL(teacher || student) {s['topk_kl'][i]:.4f}"
        text = html.escape(tok or "\u2205").replace("\n", "\u21b5\n").replace("\t", "\u21e5").replace("\r", "\u240d")
        style = f' style="background:{_gap_colour(lps[i] - lts[i])}"' if lts else ""
        spans.append(f'<span class="t {cls} {r or ""}{" clip" if clipped[i] else ""}" title="{html.escape(tip)}"'
                     f'{style}>{text}</span>')
        if r:
            counts[r] += 1
    tally = "".join(f"<br>{where} x {r}: {k} ({_effect(method, sign, r)})" for r, k in counts.items())
    meta = (f"<b>{'&#10003; correct' if s['correct'] else '&#10007; wrong'}</b><br>reward {s['reward']:g}, "
            f"advantage {s['advantage']:+.3f} ({where})<br>{n} tokens{tally}<br>clipped: {sum(map(bool, clipped))}"
            f" ({sum(map(bool, clipped)) / max(n, 1):.0%})")
    if s.get("token_advantage") is not None:  # TOP-D: tokens pushed up (A > 0) and down (A < 0)
        up = sum(a > 0 for a in s["token_advantage"])
        mean_reward = sum(s["token_reward"]) / max(n, 1)
        meta += f"<br>TOP-D: {up} tokens pushed up, {n - up} down (mean reward {mean_reward:+.3f})"
    if s.get("topk_kl") is not None:
        meta += f"<br>top-k KL: mean {sum(s['topk_kl']) / max(n, 1):.4f}, max {max(s['topk_kl'], default=0):.4f}"
    return f"<div class=resp><div class=meta>{meta}</div><div class=body>{''.join(spans)}</div></div>"


def samples_html(groups) -> str:
    """The page for one step's logged groups (RUN_DIR/samples/step_N.jsonl's lines): header, legend, groups."""
    opts = dict.fromkeys(json.dumps(g.get("options") or {}) for g in groups)
    methods = ", ".join(dict.fromkeys(html.escape(g["method"]) for g in groups))
    head = (f"<h1>step {groups[0]['step']} &middot; {methods} &middot; {len(groups)} groups</h1>"
            + "".join(f"<div>options: {html.escape(', '.join(f'{k} {v}' for k, v in json.loads(o).items()))}</div>"
                      for o in opts if o != "{}"))
    body = []
    for g in groups:
        body.append(f"<h2>group {g['group']} &middot; {html.escape(g['method'])} &middot; {len(g['samples'])} "
                    f"responses</h2><div class=prompt>{html.escape(g['prompt'])}</div>"
                    + "".join(_response_html(s, g["method"]) for s in g["samples"]))
    return (f"<!doctype html><html><head><meta charset=utf-8><title>samples, step {groups[0]['step']}</title>"
            f"<style>{CSS}</style></head><body>{head}{LEGEND.format(table=_imitation_table())}{''.join(body)}"
            "</body></html>")


def show(run_dir: str, step=None, out=None) -> str:
    """Write the HTML view of RUN_DIR/samples/step_NNNNNN.jsonl (default: the newest step); returns its path."""
    folder = os.path.join(run_dir, "samples")
    files = {int(m.group(1)): f for f in (os.listdir(folder) if os.path.isdir(folder) else ())
             if (m := re.fullmatch(r"step_(\d+)\.jsonl", f))}
    if not files or (step is not None and step not in files):
        raise FileNotFoundError(f"{folder}: no samples for step {step} (logged steps: {sorted(files)})" if files else
                                f"{folder}: no step_NNNNNN.jsonl files (the responses train.py logs)")
    path = os.path.join(folder, files[max(files) if step is None else step])
    with open(path) as f:
        groups = [json.loads(line) for line in f if line.strip()]
    if not groups:
        raise ValueError(f"{path}: no groups")
    out = out or path[:-len(".jsonl")] + ".html"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.write(samples_html(groups))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="tools/show.py", description="a step's sampled responses, token by token")
    p.add_argument("run_dir", help="run directory holding samples/step_NNNNNN.jsonl")
    p.add_argument("--step", type=int, default=None, help="default: the newest logged step")
    p.add_argument("--out", default=None, help="default: RUN_DIR/samples/step_NNNNNN.html")
    a = p.parse_args(argv)
    try:
        print(show(a.run_dir, a.step, a.out))
    except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
        p.error(f"{type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
