"""tools/show.py: one self-contained HTML page of a step's logged responses, token by token (what the teacher did),
checked as written and as a real browser (headless Chromium) renders it."""
import html.parser
import json
import os
import re
import shutil
import subprocess

import pytest

from tools import show as ev  # (interface change: the viewer left eval.py for tools/show.py)

OPTIONS = {"alpha": 0.5, "eps_low": 0.2, "eps_high": 0.28, "teacher_clamp": 1.0}


def relation(gap, c=1.0):
    return "prefers" if gap <= -c else "rejects" if gap >= c else "agrees"


def sample(tokens, adv, reward, correct, lps, lts, clipped):
    return {"response": "".join(tokens), "tokens": tokens, "token_ids": list(range(100, 100 + len(tokens))),
            "reward": reward, "advantage": adv, "correct": correct, "student_logp": lps, "teacher_logp": lts,
            "teacher": None if lts is None else [relation(a - b) for a, b in zip(lps, lts)], "clipped": clipped}


def groups(step=12):
    toks = ["<think>", " The", " knight", " &", "\n", " says", "\t<b>", "", " liar"]
    lps = [-0.1, -2.5, -0.3, -0.2, -1.0, -4.0, -0.5, -0.7, -0.05]
    lts = [-0.1, -0.5, -3.3, -0.4, -0.2, -0.5, -2.0, -0.6, -6.0]  # gaps 0, -2, +3, .2, -.8, -3.5, +1.5, -.1, +5.95
    rlad = {"step": step, "method": "rlad", "group": 3, "prompt": "A very special island <is> inhabited & ...",
            "options": OPTIONS, "samples": [
                sample(toks, 1.2, 3.0, True, lps, lts, [False, False, True, False, False, False, True, False, True]),
                sample(toks, -0.9, -1.0, False, lps, lts, [False, True, False, False, False, True] + [False] * 3),
                sample(toks[:4], 0.0, -3.0, False, lps[:4], lts[:4], [False] * 4)]}
    grpo = {"step": step, "method": "grpo", "group": 5, "prompt": "1 + 2 =",
            "options": {"eps_low": 0.2, "eps_high": 0.28},
            "samples": [sample([" 3", "\n"], 1.0, 1.0, True, [-0.2, -0.1], None, [False, True]),
                        sample([" 4"], -1.0, 0.0, False, [-1.5], None, [False])]}
    return [rlad, grpo]


def write_run(tmp_path, steps=(4, 12)):
    os.makedirs(tmp_path / "samples")
    for step in steps:
        with open(tmp_path / "samples" / f"step_{step:06d}.jsonl", "w") as f:
            f.writelines(json.dumps(g) + "\n" for g in groups(step))
    return str(tmp_path)


class Spans(html.parser.HTMLParser):
    """Token spans (class "t" inside a response body: their classes, title, style, text) and the page's text."""
    def __init__(self):
        super().__init__()
        self.spans, self.text, self.depth, self.cur = [], [], 0, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "div" and a.get("class") == "body":
            self.depth = 1
        elif self.depth and tag == "span":
            self.cur = {"cls": a.get("class", "").split(), "title": a.get("title", ""), "style": a.get("style"),
                        "text": ""}
        elif self.depth and tag == "div":
            self.depth += 1

    def handle_endtag(self, tag):
        if self.cur is not None and tag == "span":
            self.spans.append(self.cur)
            self.cur = None
        elif self.depth and tag == "div":
            self.depth -= 1

    def handle_data(self, data):
        self.text.append(data)
        if self.cur is not None:
            self.cur["text"] += data


def visible(tok):
    return (tok or "\u2205").replace("\n", "\u21b5\n").replace("\t", "\u21e5")


def check_page(page):
    """Every token as a span with its text, tooltip, colour, regime and clip marks; the legend; the header."""
    p = Spans()
    p.feed(page)
    want = [(g, s, i) for g in groups() for s in g["samples"] for i in range(len(s["tokens"]))]
    assert [sp["text"] for sp in p.spans] == [visible(s["tokens"][i]) for _, s, i in want]
    for sp, (g, s, i) in zip(p.spans, want):
        lp, lt, clip = s["student_logp"][i], s["teacher_logp"], s["clipped"][i]
        assert f"logp_S {lp:.3f}" in sp["title"] and f"clipped: {'yes' if clip else 'no'}" in sp["title"]
        assert ("clip" in sp["cls"]) == clip
        sign = {True: "pos", False: "neg"}[s["advantage"] > 0] if s["advantage"] else "nil"
        assert sign in sp["cls"]
        if lt is None:  # no teacher: no colour, regime rewarded / penalised only
            assert sp["style"] is None and "no teacher" in sp["title"] and " x teacher" not in sp["title"]
        else:
            rel = s["teacher"][i]
            assert rel in sp["cls"] and f"gap {lp - lt[i]:+.3f}" in sp["title"] and "background:#" in sp["style"]
            assert f"x teacher {rel}" in sp["title"]
    # The selective-imitation table in the tooltips, and the colour scale's ends and middle.
    assert any("gap -2.000\nregime: rewarded x teacher prefers (pushed up)" in sp["title"] for sp in p.spans)
    assert any("regime: penalised x teacher prefers (clipped: not pushed down)" in sp["title"] for sp in p.spans)
    assert any("regime: rewarded x teacher rejects (clipped: no credit)" in sp["title"] for sp in p.spans)
    assert any("regime: penalised x teacher rejects (pushed down)" in sp["title"] for sp in p.spans)
    assert any("regime: no signal x teacher agrees (no gradient)" in sp["title"] for sp in p.spans)
    assert any("regime: penalised (PPO step)" in sp["title"] for sp in p.spans)  # grpo: A's sign only
    assert ev._gap_colour(0.0) == "#ffffff" and ev._gap_colour(-9) == ev._gap_colour(-3) != ev._gap_colour(3)
    text = " ".join(" ".join(p.text).split())
    for words in ("Legend", "teacher prefers it", "teacher rejects it", "teacher agrees", "pushed up",
                  "clipped: not pushed down", "clipped: no credit", "pushed down", "ordinary PPO step",
                  "no gradient", "Methods without a teacher", "struck through", "step 12", "rlad, grpo", "2 groups",
                  "alpha 0.5", "teacher_clamp 1.0", "A very special island <is> inhabited & ...", "reward 3",
                  "advantage +1.200", "advantage -0.900", "correct", "wrong", "rewarded x prefers: 2 (pushed up)",
                  "rewarded x rejects: 3 (clipped: no credit)", "rewarded x agrees: 4 (ordinary PPO step)",
                  "clipped: 3 (33%)"):
        assert words in text, words


def test_show_writes_a_self_contained_page(tmp_path, capsys):
    run = write_run(tmp_path)
    ev.main([run])  # the newest step by default
    out = capsys.readouterr().out.strip()
    assert out == os.path.join(run, "samples", "step_000012.html")
    page = open(out, encoding="utf-8").read()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//|url\(\s*["']?\s*(https?:)?//|@import""", page)
    assert "<script" not in page and "<link" not in page
    check_page(page)
    ev.main([run, "--step", "4", "--out", str(tmp_path / "x" / "four.html")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "x" / "four.html")
    assert "step 4" in open(tmp_path / "x" / "four.html").read()
    for bad in (["--step", "7"], []):
        with pytest.raises(SystemExit):
            ev.main([str(tmp_path / "x")] + bad)
    with pytest.raises(SystemExit):
        ev.main([run, "--step", "7"])
    g = groups()
    g[0]["samples"][0]["clipped"].pop()
    with open(tmp_path / "samples" / "step_000013.jsonl", "w") as f:
        f.write(json.dumps(g[0]) + "\n")
    with pytest.raises(ValueError, match="9 tokens but 8 clipped"):
        ev.show(run)


def chromium():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        msg = "no chromium binary: install it with `apt-get install chromium` (Debian) to check the page in a browser"
        if os.environ.get("RLAD_CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return exe


def test_show_renders_in_chromium(tmp_path):
    from PIL import Image
    exe = chromium()
    page = ev.show(write_run(tmp_path / "run"))
    flags = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    url = "file://" + os.path.abspath(page)
    dom = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    check_page(dom.stdout)  # every token span, tooltip and mark, the legend, as the browser parsed them
    shot = tmp_path / "shot.png"
    r = subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1280,1600", url], capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    img = Image.open(shot).convert("RGB")
    assert img.size == (1280, 1600)
    assert len(img.getcolors(1 << 24)) > 20  # text, the diverging colours, marks: not a blank page
