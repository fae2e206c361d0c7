"""bench/sweep.py's smoke mode (tiny shapes on the CPU) and bench/report.py on small JSON.

The sweep's GPU numbers can only come from the GPU machine; here we check that the machinery works:
entries are checked and timed or reported as failures, the JSON is complete after every entry,
--resume skips what is done, bad flags name the flag, the workload groups (bias, topk, varlen,
kvcache, decode_bars) measure what they can on the CPU and say why not for the rest (CUDA-only
measures: a row each), and the report renders tables, plots and the marker blocks without
touching the hand-written text around them, for sweep files and for the former compare.py's.
"""

import importlib.util
import json
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_module(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "bench",
                                                                               f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def sweep():
    return load_module("sweep")


@pytest.fixture(scope="module")
def report():
    return load_module("report")


SMOKE = ["--smoke", "--reps", "1", "--warmup", "0", "--flush-mb", "0", "--device", "cpu"]


def test_smoke_sweep_rows_and_resume(sweep, tmp_path):
    out = tmp_path / "s.json"
    args = SMOKE + ["--json", str(out), "--only", "dense,decode",
                    "--impls", "ours,sdpa_cudnn,sdpa_flash_dense", "--filter", "causal|Sk1024"]
    assert sweep.main(args) == 0
    data = json.loads(out.read_text())
    assert data["format"] == "fsa-sweep/1"
    meta = data["meta"]
    for k in ("device", "torch", "flash_sparse_attn", "date", "command"):
        assert meta[k], k
    assert "--smoke" in meta["command"]
    assert meta["flush"] == "clean"  # the default: the flush's buffer zeroed, then read
    rows = {r["key"]: r for r in data["rows"]}
    assert set(rows) == {"dense/causal/D64/S256|ours", "dense/causal/D64/S256|sdpa_cudnn",
                         "decode/Sk1024/keep1of2|ours", "decode/Sk1024/keep1of2|sdpa_flash_dense"}
    ours = rows["dense/causal/D64/S256|ours"]
    assert ours["fail"] == {} and ours["max_diff_vs_fp64"] <= 2e-2
    for k in ("fwd_ms", "bwd_ms", "fwdbwd_ms"):
        assert ours[k] > 0, k
    assert ours["flops"] > 0 and 0.49 < ours["density"] < 0.51
    # cuDNN has no CPU kernel: a row saying so, not a dropped entry
    assert rows["dense/causal/D64/S256|sdpa_cudnn"]["fail"]["fwd"] in ("unsupported", "error")
    dec = rows["decode/Sk1024/keep1of2|ours"]
    assert dec["fwd_ms"] > 0 and "bwd_ms" not in dec and dec["bytes_moved"] > 0
    assert rows["decode/Sk1024/keep1of2|sdpa_flash_dense"]["notes"]  # marked as not checked
    # --resume: nothing left to run, rows kept, the run appended to the meta
    assert sweep.main(args + ["--resume"]) == 0
    again = json.loads(out.read_text())
    assert [r["key"] for r in again["rows"]] == [r["key"] for r in data["rows"]]
    assert len(again["meta"]["runs"]) == 2


@pytest.mark.parametrize("mode", ["clean", "zero"])
def test_timer_flush_zeroes_then_reads_its_buffer(sweep, mode):
    timer = sweep.Timer("cpu", 0, mode)
    timer.flush()  # no buffer (CPU, or --flush-mb 0): nothing to do
    # The buffer a CUDA run allocates, here on the CPU: a read after the zeroing sums zeros.
    timer.flush_buf = torch.full((1 << 12,), 7, dtype=torch.uint8)
    timer._flush_sink = torch.full((), -1, dtype=torch.int64)
    timer.flush()
    assert int(timer.flush_buf.max()) == 0
    assert int(timer._flush_sink) == (0 if mode == "clean" else -1)


def test_smoke_sweep_masked_workloads(sweep, tmp_path):
    out = tmp_path / "m.json"
    assert sweep.main(SMOKE + ["--json", str(out), "--only", "trainable,reference",
                               "--impls", "ours", "--filter", "d20|S256"]) == 0
    rows = {r["key"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"trainable/S512/d20|ours", "reference/S256/w64|ours"}
    for r in rows.values():
        assert r["fail"] == {}, r["notes"]
        assert r["max_diff_vs_fp64"] <= 3e-2 and r["fwdbwd_ms"] > 0
        assert 0 < r["density"] < 0.5


# The workload groups on the CPU, one run shared by the tests below: one workload of bias and
# kvcache, both decode_bars workloads (batch 1 has the FlexAttention row), three topk cases (their
# dense baseline first), varlen, and ours at dense256's shape.
WORKLOADS = ["--only", "bias,topk,varlen,kvcache,decode_bars,dense256",
             "--topk-cases", "key16k,row16k,mem32k",
             "--filter", r"bias/1x1/|topk/|varlen/|kvcache/B2/|decode_bars/|dense256/.*\|ours$"]


@pytest.fixture(scope="module")
def workload_run(sweep, tmp_path_factory):
    out = tmp_path_factory.mktemp("workloads") / "w.json"
    assert sweep.main(SMOKE + ["--json", str(out)] + WORKLOADS) == 0
    return out, json.loads(out.read_text())


def test_smoke_workload_groups(workload_run):
    _, data = workload_run
    rows = {r["key"]: r for r in data["rows"]}
    for r in rows.values():
        assert r["impl"] != "workload", r["notes"]          # no workload stopped early
        assert "fail" in r and "notes" in r
    workloads = {r["workload"] for r in rows.values()}
    assert workloads == {
        "bias/1x1/S256", "topk/dense/1x512x4x2x64", "topk/key16k/1x512x4x2x64",
        "topk/row16k/1x512x4x2x64", "topk/mem32k/1x1024x4x2x64", "varlen/docs6/T1024",
        "kvcache/B2/Sk2048/len512-1536", "decode_bars/B1/Sk2048", "decode_bars/B2/Sk1024",
        "dense256/causal/B1/S256"}
    assert rows["dense256/causal/B1/S256|ours"]["fwdbwd_ms"] > 0

    def row(workload, impl):
        return rows[f"{workload}|{impl}"]

    # decode_bars: ours one call, back to back and paged (bitwise equal) against the device copy;
    # the kernels-only measures need CUDA: rows saying so; Flex at batch 1 only.
    for b, sk in ((1, 2048), (2, 1024)):
        w = f"decode_bars/B{b}/Sk{sk}"
        copy = row(w, "device_copy")
        assert copy["fwd_ms"] > 0 and copy["bytes_moved"] == 2 * (16 << 20)   # read + written
        one = row(w, "one_call")
        assert one["fail"] == {} and one["max_diff_vs_fp64"] <= 2e-2 and one["bytes_moved"] > 0
        assert set(one["extra"]) == {"copy_share", "gbps_copy"}
        assert row(w, "back_to_back")["fwd_ms"] > 0
        for impl in ("kvcache_one_call", "paged"):
            assert row(w, impl)["fail"] == {}
            assert "bitwise equal to flash_sparse_attn_func" in row(w, impl)["notes"]
        assert row(w, "paged")["extra"]["paged_ratio"] > 0
        assert row(w, "paged_back_to_back")["extra"]["paged_ratio"] > 0
        for impl in ("kernels", "paged_kernels"):
            assert row(w, impl)["fail"] == {"fwd": "unavailable"}
            assert "needs CUDA" in row(w, impl)["notes"][0]
        assert row(w, "sdpa_flash_dense")["extra"]["ours_ratio"] > 0
        assert row(w, "host")["fwd_ms"] > 0 and row(w, "sdpa_host")["fwd_ms"] > 0
        assert row(w, "host")["extra"]["host_ratio"] > 0
        assert (f"{w}|flex" in rows) == (b == 1)
    # kvcache: the lengths as a mask agree with cache_seqlens
    w = "kvcache/B2/Sk2048/len512-1536"
    mask = row(w, "lengths_as_mask")
    assert mask["fail"] == {} and mask["extra"]["lengths_speedup"] > 0
    assert any(n.startswith("max|diff| vs cache_seqlens") for n in mask["notes"])
    assert row(w, "cache_seqlens")["fwd_ms"] > 0
    assert row(w, "cuda_graph")["fail"] == {"fwd": "unavailable"}      # CUDA graphs need CUDA
    assert row(w, "sdpa_flash_dense")["extra"]["ours_ratio"] > 0
    # bias: default and deterministic bias gradients agree; the peers have no CPU backward here
    w = "bias/1x1/S256"
    assert row(w, "ours")["fwdbwd_ms"] > 0 and row(w, "ours")["max_diff_vs_fp64"] <= 2e-2
    assert any(n.startswith("dbias vs default") for n in row(w, "deterministic")["notes"])
    assert row(w, "sdpa_eff_mask")["fail"] and row(w, "flex")["fail"]
    # varlen: per-document gradients checked against the packed call, then the #15 ratio
    w = "varlen/docs6/T1024"
    assert row(w, "varlen")["fwd_ms"] > 0 and row(w, "varlen")["fwdbwd_ms"] > 0
    assert row(w, "per_document")["fail"] == {} and "dbias" in row(w, "per_document")["notes"][0]
    ratio = row(w, "ratio:fwd-bwd-varlen-per-document")
    assert ratio["ratio"] > 0 and ratio["bars"][0]["issue"] == "#15"
    assert row(w, "ratio:fwd-bwd-flexattention-varlen")["fail"] == {"ratio": "n/a"}
    # topk: the cases read their shape's dense baselines from the file; the reference kernel and
    # the peak memory need CUDA
    dense = row("topk/dense/1x512x4x2x64", "dense")
    assert dense["fwd_ms"] > 0 and dense["fwdbwd_ms"] > 0
    for case in ("key16k", "row16k"):
        w = f"topk/{case}/1x512x4x2x64"
        assert row(w, "ours")["max_diff_vs_fp64"] <= 2e-2
        assert row(w, "topk")["fwdbwd_ms"] > 0 and row(w, "topk")["notes"]  # checked vs ours
        assert row(w, "ref")["fail"] == {"fwd": "unavailable", "fwdbwd": "unavailable"}
        assert row(w, "ratio:fwd-bwd-in-call-our-dense")["ratio"] == pytest.approx(
            row(w, "topk")["fwdbwd_ms"] / dense["fwdbwd_ms"])
    assert "topk/key16k/1x512x4x2x64|flex" in rows and "topk/row16k/1x512x4x2x64|flex" not in rows
    w = "topk/mem32k/1x1024x4x2x64"
    assert row(w, "dense")["fail"] == {"peak_fwdbwd": "unavailable"}
    assert row(w, "ratio:peak-per-row-dense")["fail"] == {"ratio": "n/a"}


def test_workload_groups_resume_whole_workloads(sweep, workload_run, tmp_path):
    path, data = workload_run
    # A cut run: kvcache's rows missing. --resume runs that workload again, and only it.
    cut = dict(data, rows=[r for r in data["rows"] if not r["workload"].startswith("kvcache/")])
    out = tmp_path / "cut.json"
    out.write_text(json.dumps(cut))
    assert sweep.main(SMOKE + ["--json", str(out), "--resume"] + WORKLOADS) == 0
    again = json.loads(out.read_text())
    assert sorted(r["key"] for r in again["rows"]) == sorted(r["key"] for r in data["rows"])
    assert {r["workload"] for r in again["rows"][len(cut["rows"]):]} == {
        "kvcache/B2/Sk2048/len512-1536"}
    assert len(again["meta"]["runs"]) == 2


@pytest.mark.parametrize("error, kind", [
    ("Wrong", "wrong"), ("OutOfMemoryError", "oom"), ("RuntimeError", "error")])
def test_a_stopped_workload_is_a_row(sweep, tmp_path, monkeypatch, error, kind):
    exception = {"Wrong": sweep.Wrong, "OutOfMemoryError": torch.cuda.OutOfMemoryError,
                 "RuntimeError": RuntimeError}[error]

    def stops(w):
        w.measure("ours", "flash_sparse_attn", "fwd", lambda: None)
        raise exception("stopped by the test")

    monkeypatch.setitem(sweep.WORKLOAD_RUNNERS, "varlen", stops)
    out = tmp_path / "v.json"
    assert sweep.main(SMOKE + ["--json", str(out), "--only", "varlen"]) == 0
    rows = {r["impl"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["ours"]["fwd_ms"] >= 0                     # what it measured before is kept
    assert rows["workload"]["fail"] == {"workload": kind}
    assert rows["workload"]["label"] == "(whole workload)"
    assert "stopped by the test" in rows["workload"]["notes"][0]


@pytest.mark.parametrize("argv, flag", [
    (["--only", "dense,bogus"], "--only"),
    (["--impls", "ours,nope"], "--impls"),
    (["--only", "dense,topk", "--impls", "ours"], "--impls"),
    (["--topk-cases", "key16k,nope"], "--topk-cases"),
    (["--reps", "0"], "--reps"),
    (["--dtype", "fp8"], "--dtype"),
    (["--resume"], "--resume"),
    (["--filter", "("], "--filter"),
])
def test_bad_flags_name_the_flag(sweep, capsys, argv, flag):
    with pytest.raises(SystemExit) as e:
        sweep.parse_args(["--smoke"] + argv)
    assert e.value.code == 2
    assert flag in capsys.readouterr().err


def test_entries_cover_the_issue(sweep):
    assert sweep.parse_args(["--list"]).groups == ["dense", "trainable", "reference", "decode"]
    entries = sweep.enumerate_entries(sweep.GROUPS, False, False, "cuda", None, None)
    keys = {f"{w}|{i}" for _, w, impls in entries for i in impls}
    assert len([k for k in keys if k.startswith("dense/") and k.endswith("|ours")]) == 12
    assert "trainable/S65536/d5|flex" in keys and "trainable/S16384/d10|sdpa_eff_mask" in keys
    assert "reference/S256/w1024|ours" in keys and "reference/S32768/w1024|flex" in keys
    assert "decode/Sk524288/keep1of8|ours" in keys and "decode/Sk4096/keep1of8|flex" in keys


def test_selection_bars_are_the_issue_densities(sweep):
    # Issue #14's block-selection bars: 6.4 / 12 / 22% at S = 16K and 6.2% at S = 32K, ours and
    # Flex, run as trainable workloads (their rows sit in the trainable tables).
    entries = sweep.enumerate_entries(["selection_bars"], False, False, "cuda", None, None)
    assert [(w, impls) for _, w, impls in entries] == [
        (f"trainable/S{S}/d{d}", ["ours", "flex"])
        for S, d in ((16384, "6.4"), (16384, "12"), (16384, "22"), (32768, "6.2"))]
    assert all(s["group"] == "trainable" and s["D"] == 128 and s["Hk"] == 8 for s, _, _ in entries)
    assert "selection_bars" in sweep.ALL_GROUPS and "selection_bars" not in sweep.GROUPS


def test_workload_entries_are_the_bars(sweep):
    entries = sweep.enumerate_entries(sweep.ALL_GROUPS, False, False, "cuda", None, None)
    whole = [w for _, w, impls in entries if impls is None]
    assert [s for s, w, _ in entries if w == "dense256/causal/B1/S16384"][0]["D"] == 256
    assert len([w for w in whole if w.startswith("bias/")]) == 4
    assert "varlen/docs16/T65536" in whole and "kvcache/B64/Sk32768/len8192-32768" in whole
    assert [w for w in whole if w.startswith("decode_bars/")] == [
        f"decode_bars/B{b}/Sk{sk}" for b, sk in sweep.DECODE_BAR_CASES]
    topk = [w for w in whole if w.startswith("topk/")]
    assert topk == ["topk/dense/1x16384x32x8x128", "topk/key16k/1x16384x32x8x128",
                    "topk/row16k/1x16384x32x8x128", "topk/dense/1x32768x32x8x128",
                    "topk/key32k/1x32768x32x8x128", "topk/mem32k/1x32768x32x8x128",
                    "topk/dense/1x32768x2x1x64", "topk/keyref/1x32768x2x1x64",
                    "topk/rowref/1x32768x2x1x64"]
    # --topk-cases: in the order given; a memory case alone needs no dense baseline
    entries = sweep.enumerate_entries(["topk"], False, False, "cuda", None, None,
                                      ["rowref", "mem32k"])
    assert [w for _, w, _ in entries] == ["topk/dense/1x32768x2x1x64",
                                          "topk/rowref/1x32768x2x1x64",
                                          "topk/mem32k/1x32768x32x8x128"]


def synthetic_results():
    """A tiny fsa-sweep/1 file for exercising the report (test data, not measurements)."""
    rows = []
    meta = dict(device="TestCard", torch="t", triton="t", flash_sparse_attn="0", git="abc",
                date="2000-01-01T00:00:00", command="python3 bench/sweep.py --test")
    def add(group, wkey, spec, impl, density, **kw):
        r = dict(key=f"{wkey}|{impl}", workload=wkey, group=group, spec=spec, impl=impl,
                 label=impl, fail={}, notes=[], density=density, flops=1e9, bytes_moved=1e6,
                 density_independent=impl.startswith("sdpa") and group == "trainable")
        r.update(kw)
        rows.append(r)
    for d in (0.05, 0.2):
        spec = dict(group="trainable", S=4096, B=1, H=4, Hk=2, D=64, causal=True, target=d)
        w = f"trainable/S4096/d{int(d * 100)}"
        add("trainable", w, spec, "ours", d, fwd_ms=1.0 + d, bwd_ms=2.0, fwdbwd_ms=3.0,
            peak_fwd_mb=1.0, peak_fwdbwd_mb=2.0)
        add("trainable", w, spec, "flex", d, fwd_ms=1.5, bwd_ms=2.5, fwdbwd_ms=4.0,
            first_call_s=9.0, first_train_s=20.0)
    spec = dict(group="trainable", S=4096, B=1, H=4, Hk=2, D=64, causal=True, target=0.05)
    add("trainable", "trainable/S4096/d5", spec, "sdpa_eff_mask", 0.05, fwd_ms=5.0,
        fail={"bwd": "oom", "fwdbwd": "oom", "peak_fwdbwd": "oom"}, notes=["OutOfMemoryError"])
    spec = dict(group="dense", causal=True, B=1, S=4096, H=4, Hk=4, D=256)
    add("dense", "dense/causal/D256/S4096", spec, "ours", 0.5, fwd_ms=1.0,
        fail={"bwd": "unsupported", "fwdbwd": "unsupported", "peak_fwdbwd": "unsupported"},
        notes=["RuntimeError: head_dim <= 128 only"])
    for sk in (4096, 8192):
        spec = dict(group="decode", Sk=sk, keep_every=8, B=1, H=4, Hk=2, D=64, causal=True)
        add("decode", f"decode/Sk{sk}/keep1of8", spec, "ours", 0.125, fwd_ms=0.01 * sk / 4096)
    return {"format": "fsa-sweep/1", "meta": dict(meta, runs=[meta]), "rows": rows}


def test_report_writes_blocks_and_plots(report, tmp_path):
    pytest.importorskip("matplotlib")
    res = tmp_path / "r.json"
    res.write_text(json.dumps(synthetic_results()))
    perf = tmp_path / "perf.md"
    perf.write_text("# Perf\n\nhand-written text\n")
    readme = tmp_path / "README.md"
    readme.write_text("# X\n\n## Status\n\nstatus text\n\n## How it works\n\nmore\n")
    plots = tmp_path / "plots"
    argv = [str(res), "--perf", str(perf), "--readme", str(readme), "--plots", str(plots)]
    assert report.main(argv) == 0
    p, r = perf.read_text(), readme.read_text()
    assert p.startswith("# Perf\n\nhand-written text\n") and report.BEGIN_PERF in p
    assert "TestCard" in p and "`python3 bench/sweep.py --test`" in p
    assert "OOM" in p and "unsup." in p and "head_dim <= 128" in p
    assert "9.0 s / 20.0 s" in p                               # Flex compile time, apart
    # headline block after the Status section, before the next section
    assert r.index("status text") < r.index(report.BEGIN_README) < r.index("## How it works")
    assert "trainable_density.png" in r
    for name in ("trainable_density.png", "decode_sk.png", "dense_tflops.png"):
        assert (plots / name).stat().st_size > 1000, name
    # idempotent: a second run replaces the blocks, it does not add new ones
    assert report.main(argv) == 0
    assert perf.read_text() == p and readme.read_text() == r


def test_report_reads_compare_py_json(report, tmp_path, capsys):
    # The compare.py format of docs/compare_h100_2026-11-26.json, with our dense causal forward
    # set to known numbers (the file itself is rewritten by every GPU run).
    with open(os.path.join(ROOT, "docs", "compare_h100_2026-11-26.json")) as f:
        data = json.load(f)
    ours = [r for r in data["rows"]
            if r["workload"].startswith("dense causal fwd") and r["impl"] == "flash_sparse_attn"]
    assert len(ours) == 1
    ours[0].update(ms=6.65, tflops=331.0)
    legacy = tmp_path / "compare.json"
    legacy.write_text(json.dumps(data))
    assert report.main([str(legacy), "--stdout", "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "NVIDIA H100 80GB HBM3" in out and report.BEGIN_README in out
    assert "| causal D=128 S=16K (2,16384,16,16,128) | 6.65 (331)" in out


def test_report_renders_workload_groups(report, workload_run, capsys):
    path, _ = workload_run
    assert report.main([str(path), "--stdout", "--no-plots"]) == 0
    out = capsys.readouterr().out
    for g in ("bias", "topk", "varlen", "kvcache", "decode_bars", "dense256"):
        assert f"### {report.GROUP_TITLES[g]}" in out, g
    assert "decode fwd (1,1,2048,4,2,64) 1/8 blocks (`decode_bars/B1/Sk2048`):" in out
    assert "| flash_sparse_attn_with_kvcache, paged (page 64) | " in out
    assert "bitwise equal to flash_sparse_attn_func" in out
    assert "| flash_sparse_attn, kernels only (profiler) | unavail. |" in out
    assert "max\\|diff\\|" in out                          # pipes in notes escaped
    assert "| ratio fwd+bwd: varlen / per document |" in out and "[#15 <= 1.15:" in out
    assert "| ours, topk=64, topk_causal=True | " in out


def test_report_reads_compare_py_workload_groups(report, capsys):
    # The former compare.py's JSON of its bar groups, as committed in docs/.
    files = [os.path.join(ROOT, "docs", f) for f in (
        "compare_bias_h100_2026-11-26.json", "varlen_h200_2026-12-02_s11.json",
        "decode_h200_2026-12-02_s13c.json", "topk_h200_2026-12-02_s10.json",
        "d256_decode_kvcache_h200_2026-12-02_s13b.json", "kvcache_graph_h200_2026-12-02_s13d.json")]
    assert report.main(files + ["--stdout", "--no-plots"]) == 0
    out = capsys.readouterr().out
    for g in ("bias", "topk", "varlen", "kvcache", "decode_bars", "dense256"):
        assert f"### {report.GROUP_TITLES[g]}" in out, g
    assert "| flash_sparse_attn deterministic | 2.70 (178) |" in out
    assert "0.726  [#15 <= 1.15: met]" in out
    assert "| flash_sparse_attn, kernels only (profiler) | 0.080 (3343 GB/s) |" in out
    assert "| reference Triton, same mask | " in out and "WRONG: dq" in out
    assert "| causal D=256 S=16K (1,16384,16,16,256) | 10.6 (208)" in out
    assert "| flash_sparse_attn, cache_seqlens, CUDA graph replay | " in out
    assert "bitwise equal to the eager call" in out and "graph_speedup" in out


def test_report_rejects_bad_input(report, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "other/9", "rows": []}')
    with pytest.raises(SystemExit):
        report.main([str(bad), "--stdout"])
    assert "unknown format" in capsys.readouterr().err


def sweep_json(path, rows, device="H200"):
    path.write_text(json.dumps({"format": "fsa-sweep/1", "meta": {"device": device},
                                "rows": rows}))
    return str(path)


def test_ab_table_compares_best_runs(tmp_path, capsys):
    """bench/ab.py (scripts/ab_check.sh's table): each side's best run, its spread, head / base,
    and head / peer over the head runs that measured the peer (a better run of ours in another
    process does not count against it); measures a side failed or lacks are left out."""
    ab = load_module("ab")
    w = "trainable/S16384/d22"

    def row(impl, fwd, fwdbwd, fail=None):
        return {"key": f"{w}|{impl}", "workload": w, "impl": impl, "fwd_ms": fwd,
                "fwdbwd_ms": fwdbwd, "fail": fail or {}}

    base = [sweep_json(tmp_path / "b1.json", [row("ours", 2.0, 8.0)]),
            sweep_json(tmp_path / "b2.json", [row("ours", 2.2, 8.8)])]
    head = [sweep_json(tmp_path / "h1.json", [row("ours", 1.5, 9.0, {"fwdbwd_ms": "error"}),
                                              row("flex", 3.0, 12.0)]),
            sweep_json(tmp_path / "h2.json", [row("ours", 1.2, 7.0)])]
    assert ab.main(["--base", *base, "--head", *head]) == 0
    lines = {tuple(l.split()[:3]): l.split() for l in capsys.readouterr().out.splitlines()}
    fwd = lines[(w, "ours", "fwd")]
    assert [float(x) for x in fwd[3:8]] == pytest.approx([2.0, 1.2, 0.6, 0.1, 0.25])
    assert fwd[8:] == ["flex", "0.500"]  # h1's 1.5 against h1's flex, not h2's 1.2
    fwdbwd = lines[(w, "ours", "fwdbwd")]  # the failed head run is not a time
    assert [float(x) for x in fwdbwd[3:5]] == pytest.approx([8.0, 7.0])
    assert fwdbwd[8:] == []  # no head run measured both
    assert (w, "ours", "bwd") not in lines  # measured by neither side


def test_ab_rejects_other_files(tmp_path, capsys):
    ab = load_module("ab")
    other = tmp_path / "x.json"
    other.write_text(json.dumps({"format": "something-else", "rows": []}))
    ok = sweep_json(tmp_path / "ok.json", [])
    with pytest.raises(SystemExit, match="not an fsa-sweep/1 file"):
        ab.main(["--base", str(other), "--head", ok])
    assert ab.main(["--base", ok, "--head", ok]) == 1  # nothing measured by both sides
    assert "no workload measured by both sides" in capsys.readouterr().err


def test_smoke_softcap_group(sweep, tmp_path):
    """The softcap group: ours with softcap 30 and a per-key bias, checked against float64 with
    the cap applied (a cap small enough to matter changes the reference, and ours follows it)."""
    out = tmp_path / "s.json"
    assert sweep.main(SMOKE + ["--json", str(out), "--only", "softcap", "--impls", "ours"]) == 0
    rows = {r["key"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"softcap/causal/D64/S256/c30|ours", "softcap/full/D64/S256/c30|ours"}
    for r in rows.values():
        assert r["fail"] == {} and r["max_diff_vs_fp64"] <= 3e-2 and r["spec"]["softcap"] == 30
        assert r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0
    spec = dict(sweep.softcap_specs(False, True)[0], softcap=0.5)
    p = sweep.Problem(spec, "cpu", torch.bfloat16)
    ours = p.ours_out()
    capped = p.check_ours(ours)
    uncapped = sweep.fp64_row_error(ours, p.q, p.k, p.v, p.keep_row,
                                    lambda b, h, i: p.bias[b, h // p.G, 0])
    assert capped <= 3e-2 and uncapped > 10 * capped, (capped, uncapped)
