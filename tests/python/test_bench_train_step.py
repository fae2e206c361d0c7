"""bench/train_step.py on the CPU: its --smoke run (a tiny model) checks the fsa variant, times
every variant or says why not, prints the table last and writes its JSON; and its check fails when
the attention is wrong. Its GPU numbers can only come from the GPU machine."""

import importlib.util
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "bench", "train_step.py")


def test_smoke_run(tmp_path):
    out = tmp_path / "train_step.json"
    proc = subprocess.run([sys.executable, SCRIPT, "--smoke", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert data["check"]["ok"]
    assert {r["what"] for r in data["check"]["results"]} >= {"loss", "layer 0 dbias"}
    rows = {(r["variant"], r["tokens"]): r for r in data["rows"]}
    assert set(rows) == {(v, s) for v in ("fsa", "sdpa-math", "flex-gather") for s in (64, 128)}
    for seq_len in (64, 128):
        for variant in ("fsa", "sdpa-math"):
            row = rows[variant, seq_len]
            assert row["step_ms"] > 0 and row["attention_ms"] > 0, row
        # FlexAttention has no backward on CPUs: a row saying so, not a dropped variant
        assert "error" in rows["flex-gather", seq_len]
    assert set(data["fsa_over_best_sdpa"]) == {"64", "128"}
    assert proc.stdout.rstrip().splitlines()[-1].startswith("fsa / sdpa-math step at 128 tokens")


def test_check_catches_wrong_attention(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_train_step", SCRIPT)
    train_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_step)
    # dense causal attention: the top-k mask and the bias dropped
    monkeypatch.setattr(train_step, "attend_fsa", train_step.VARIANTS["sdpa-math"])
    cfg = train_step.SMOKE
    base = train_step.DogeStyleLM(cfg).to(dtype=train_step.torch.bfloat16)
    check = train_step.check_fsa(base, cfg, train_step.torch.device("cpu"))
    assert not check["ok"]
    failed = {r["what"] for r in check["results"] if not r["ok"]}
    assert "layer 0 out" in failed and "layer 0 dbias" in failed


def test_per_row_variant_is_checked_and_timed(tmp_path):
    """fsa-rows (the 4-D causal mask a transformers model passes: per-row top-k) gets its own
    check against float64 with create_mask's per-row selection, and its rows."""
    out = tmp_path / "train_step_rows.json"
    proc = subprocess.run([sys.executable, SCRIPT, "--smoke", "--sizes", "64", "--variants",
                           "fsa-rows,sdpa-math", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert data["checks"]["fsa-rows"]["ok"] and data["checks"]["fsa"]["ok"]
    rows = {r["variant"]: r for r in data["rows"]}
    assert rows["fsa-rows"]["step_ms"] > 0 and "note" not in rows["fsa-rows"]


def test_per_row_check_catches_the_global_selection(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_train_step_rows", SCRIPT)
    train_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_step)
    # the global top-k (attention_mask None) where each row's own top-k is asked for
    monkeypatch.setattr(train_step, "attend_fsa_rows", train_step.attend_fsa)
    cfg = train_step.SMOKE
    base = train_step.DogeStyleLM(cfg).to(dtype=train_step.torch.bfloat16)
    check = train_step.check_fsa(base, cfg, train_step.torch.device("cpu"), "fsa-rows")
    assert not check["ok"]
