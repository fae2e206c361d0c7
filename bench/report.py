#!/usr/bin/env python3
"""Performance report from sweep JSON: PNG plots, the generated section of docs/perf.md and the
README's headline block. Runs on any machine with matplotlib (no torch, no GPU needed).

    python3 bench/report.py RESULTS.json [MORE.json ...] [--perf docs/perf.md] [--readme README.md]
                            [--plots docs/plots] [--stdout]

Inputs: files written by bench/sweep.py (format "fsa-sweep/1") and files written by the former
bench/compare.py --json (merged into sweep.py; the older {"device", "torch", "date", "command",
"rows": [{"workload", "impl", "ms", "note", ...}]} format, e.g. docs/compare_h100_2026-11-26.json
and the topk / decode / varlen JSON in docs/), in any mix. When the same (workload,
implementation) entry appears in several files the last file given wins.

The groups measured per (workload, implementation) entry get tables with a column per
implementation (and plots); the workload groups (bias, topk, varlen, kvcache, decode_bars) a
table per workload, a row per implementation, with its notes, derived numbers and ratios.

Outputs replace only what lies between the markers
    <!-- BEGIN GENERATED: bench/report.py -->  ...  <!-- END GENERATED -->            (docs/perf.md)
    <!-- BEGIN GENERATED: bench/report.py (headline) -->  ...  <!-- END GENERATED --> (README.md)
(added when missing: at the end of perf.md, after the README's Status section). Every number
comes from the JSON; nothing is typed in.
"""

import argparse
import json
import os
import re
import sys

BEGIN_PERF = "<!-- BEGIN GENERATED: bench/report.py -->"
BEGIN_README = "<!-- BEGIN GENERATED: bench/report.py (headline) -->"
END = "<!-- END GENERATED -->"
GROUPS = ("dense", "trainable", "reference", "decode")          # the README headline's
ENTRY_GROUPS = ("dense", "dense256", "softcap", "trainable", "reference", "decode")
WORKLOAD_GROUPS = ("bias", "topk", "varlen", "kvcache", "decode_bars")
DENSE_GROUPS = ("dense", "dense256", "softcap")
GROUP_TITLES = {
    "dense": "Dense attention (no mask)",
    "dense256": "Dense causal attention at head dim 256 (issue #14's bar shape)",
    "softcap": "Dense attention with softcap and a per-key bias (B, Hk, 1, S)",
    "trainable": "Trainable mask: bias (B, Hk, 1, S), causal, diagonal + top-k 128-key blocks by "
                 "mean bias",
    "reference": "The reference project's published configuration: (1, S, 2, 1, 64), causal, "
                 "top-1024 keys per query by a per-key bias",
    "decode": "Decode: Sq = 1, key mask keeping 1/8 of the 128-key blocks",
    "bias": "Bias gradients: a full bias broadcast over batch and/or heads, deterministic mode "
            "(issue #5)",
    "topk": "The reference's top-k workflow: key mask and per-row top-k, causal, bias gradient "
            "(issues #11, #12)",
    "varlen": "Packed documents: one varlen call, the documents one by one, FlexAttention with a "
              "document mask (issue #15)",
    "kvcache": "Decode steps over caches with per-sequence lengths (issue #15)",
    "decode_bars": "Decode bars: one call, 8 back to back, paged, kernels alone, against the "
                   "device copy; host time per call (issue #15)",
}
IMPL_ORDER = ["ours", "sdpa_flash", "sdpa_cudnn", "sdpa_eff_mask", "sdpa_cudnn_mask",
              "sdpa_math_mask", "sdpa_flash_dense", "flex"]
LABELS = {
    "ours": "flash_sparse_attn",
    "sdpa_flash": "SDPA flash",
    "sdpa_cudnn": "SDPA cuDNN",
    "sdpa_flash_dense": "SDPA flash, all keys (not equivalent)",
    "sdpa_eff_mask": "SDPA mem-efficient + mask",
    "sdpa_cudnn_mask": "SDPA cuDNN + mask",
    "sdpa_math_mask": "SDPA math + mask",
    "flex": "FlexAttention",
}
SHORT_FAIL = {"oom": "OOM", "unsupported": "unsup.", "unavailable": "unavail.", "error": "err",
              "wrong": "wrong"}
# Flops multipliers of the measures relative to the forward's (the convention of docs/perf.md).
FLOP_MULT = {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}
MEASURE_TITLES = {"fwd": "Forward", "bwd": "Backward", "fwdbwd": "Forward + backward"}


class ReportError(Exception):
    pass


# ------------------------------------------------------------------------------------------------
# Loading


def load(paths):
    """-> (runs: list of run dicts, rows: dict key -> row). Rows of later files replace earlier."""
    runs, rows = [], {}
    for path in paths:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ReportError(f"{path}: cannot read a JSON results file ({e})") from e
        if not isinstance(data, dict) or "rows" not in data:
            raise ReportError(f"{path}: not a results file (expected an object with 'rows')")
        if data.get("format") == "fsa-sweep/1":
            meta = data["meta"]
            for run in meta.get("runs") or [meta]:
                runs.append(dict(run, file=path))
            for r in data["rows"]:
                rows[r["key"]] = dict(r, file=path)
        elif "format" in data:
            raise ReportError(f"{path}: unknown format {data['format']!r} (expected fsa-sweep/1)")
        else:
            run = {k: data.get(k) for k in ("device", "torch", "date", "command")}
            run.update(file=path, legacy=True)
            runs.append(run)
            for r in convert_legacy(data["rows"]):
                rows[r["key"]] = dict(r, file=path)
    return runs, rows


def legacy_fail(note):
    """The failure label of a compare.py row without a time, from its note."""
    low = note.lower()
    return ("oom" if "out of memory" in low else "wrong" if "wrong" in low
            else "unavailable" if "not available" in low or "unavailable" in low
            else "unsupported" if "unsupported" in low else "error")


def legacy_workload_group(workload, labels):
    """The workload group of a compare.py workload (its implementations' labels given), or None
    for the dense / trainable / decode workloads the entry groups read."""
    if workload.startswith("bias ("):
        return "bias"
    if (workload.startswith("topk ") or workload.endswith("(no mask, no bias)")
            or "(whole case)" in labels):
        return "topk"
    if workload.startswith("varlen ("):
        return "varlen"
    if workload.startswith("decode step, cache"):
        return "kvcache"
    if workload.startswith("device copy") or (
            workload.startswith("decode fwd") and any(x.startswith("flash_sparse_attn, ")
                                                      for x in labels)):
        return "decode_bars"
    return None


LEGACY_EXTRA = ("copy_share", "gbps_copy", "paged_ratio", "paged_kernel_ratio", "lengths_speedup",
                "graph_speedup", "ours_ratio")


def convert_legacy(rows):
    """Rows of bench/compare.py's JSON -> sweep rows (fwd and fwd+bwd merged per impl)."""
    labels = {}
    for r in rows:
        labels.setdefault(r["workload"], []).append(r["impl"].strip())
    groups = {w: legacy_workload_group(w, ls) for w, ls in labels.items()}
    return (convert_legacy_entries([r for r in rows if groups[r["workload"]] is None])
            + convert_legacy_workloads([r for r in rows if groups[r["workload"]]], groups))


def convert_legacy_workloads(rows, groups):
    """compare.py rows of the workload groups -> sweep rows: one per (workload, implementation
    label), keyed by the compare.py workload name, which is also the title."""
    out = {}
    for r in rows:
        w, group = r["workload"], groups[r["workload"]]
        label = r["impl"].strip()
        measure = "fwd"
        if label.endswith(" fwd+bwd"):
            label, measure = label[: -len(" fwd+bwd")], "fwdbwd"
        wkey = f"{group}/{w}"
        impl = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
        row = out.setdefault(f"{wkey}|{impl}", dict(
            key=f"{wkey}|{impl}", workload=wkey, group=group, spec=dict(group=group, title=w),
            impl=impl, label=label, fail={}, notes=[], extra={}))
        note = r.get("note") or ""
        if note and note not in row["notes"]:
            row["notes"].append(note)
        row["extra"].update({k: r[k] for k in LEGACY_EXTRA if k in r})
        if label.startswith("ratio "):
            if r.get("ratio") is None:
                row["fail"]["ratio"] = "n/a"
            else:
                row["ratio"] = r["ratio"]
        elif "peak_mb" in r:
            row["peak_fwdbwd_mb"] = r["peak_mb"]
        elif r.get("ms") is not None:
            row[f"{measure}_ms"] = r["ms"]
            if r.get("tflops"):
                row["flops"] = r["tflops"] * r["ms"] * 1e9 / FLOP_MULT[measure]
            if r.get("gbps"):
                row["bytes_moved"] = r["gbps"] * r["ms"] * 1e6
        elif "gbps_copy" not in r:
            row["fail"][measure] = legacy_fail(note)
    return list(out.values())


def convert_legacy_entries(rows):
    """compare.py rows of the dense, dense256, trainable and decode workloads -> sweep rows."""
    out = {}
    density = {}
    for r in rows:
        w = r["workload"]
        m = re.search(r"\(([\d,]+)\)", w)
        dims = [int(x) for x in m.group(1).split(",")] if m else []
        impl_label = r["impl"].strip()
        if impl_label.startswith("of which"):
            continue
        fwdbwd = impl_label.endswith(" fwd+bwd")
        if fwdbwd:
            impl_label = impl_label[: -len(" fwd+bwd")]
        if impl_label.startswith("flash_sparse_attn"):
            impl = "ours"
        elif impl_label.startswith("SDPA flash, all keys"):
            impl = "sdpa_flash_dense"
        elif impl_label.startswith("SDPA flash"):
            impl = "sdpa_flash"
        elif impl_label.startswith("SDPA cuDNN"):
            impl = "sdpa_cudnn"
        elif impl_label.startswith("FlexAttention"):
            impl = "flex"
        else:
            continue
        if w.startswith("dense") and dims == [1, 16384, 16, 16, 256]:     # compare's dense256
            B, S, H, Hk, D = dims
            spec = dict(group="dense256", causal=True, B=B, S=S, H=H, Hk=Hk, D=D)
            key = f"dense256/causal/B{B}/S{S}"
        elif w.startswith("dense") and len(dims) == 5:
            B, S, H, Hk, D = dims
            causal = "causal" in w
            spec = dict(group="dense", causal=causal, B=B, S=S, H=H, Hk=Hk, D=D)
            key = f"dense/{'causal' if causal else 'full'}/D{D}/S{S}"
        elif w.startswith("trainable") and len(dims) == 5:
            B, S, H, Hk, D = dims
            top = re.search(r"top-(\d+)", w)
            spec = dict(group="trainable", causal=True, B=B, S=S, H=H, Hk=Hk, D=D)
            key = f"trainable/S{S}/top{top.group(1) if top else '?'}"
        elif w.startswith("decode") and len(dims) == 6:
            B, _, Sk, H, Hk, D = dims
            spec = dict(group="decode", causal=True, B=B, Sk=Sk, H=H, Hk=Hk, D=D, keep_every=8)
            key = f"decode/Sk{Sk}/keep1of8"
        else:
            continue
        row = out.setdefault(f"{key}|{impl}", dict(
            key=f"{key}|{impl}", workload=key, group=spec["group"], spec=spec, impl=impl,
            label=LABELS[impl], fail={}, notes=[], density_independent=False))
        note = r.get("note") or ""
        dm = re.search(r"density ([\d.]+)%", note)
        if dm:
            density[key] = float(dm.group(1)) / 100
        measure = "fwdbwd" if fwdbwd else "fwd"
        if r.get("ms") is None:
            row["fail"][measure] = legacy_fail(note)
            row["notes"].append(note)
            continue
        row[f"{measure}_ms"] = r["ms"]
        if "tflops" in r and r["tflops"]:
            row["flops"] = r["tflops"] * r["ms"] * 1e9 / FLOP_MULT[measure]
        if "gbps" in r and r["gbps"] and impl != "sdpa_flash_dense":
            row["bytes_moved"] = r["gbps"] * r["ms"] * 1e6
        if "max|diff|" in note:
            row["notes"].append(note)
    for row in out.values():
        w = row["workload"]
        if w in density:
            row["density"] = density[w]
        elif row["group"] in DENSE_GROUPS:
            row["density"] = 0.5 if row["spec"]["causal"] else 1.0
        elif row["group"] == "decode":
            row["density"] = 1 / 8
        if row["group"] != "decode":
            for m in ("bwd", "peak_fwd", "peak_fwdbwd"):
                row["fail"].setdefault(m, "n/a")
        else:
            row["fail"].setdefault("peak_fwd", "n/a")
    # FLOP counts are per workload: give every impl the count ours reported.
    flops = {r["workload"]: r["flops"] for r in out.values() if r["impl"] == "ours" and "flops" in r}
    for row in out.values():
        if row["workload"] in flops:
            row["flops"] = flops[row["workload"]]
    return list(out.values())


# ------------------------------------------------------------------------------------------------
# Formatting helpers


def fmt_ms(v):
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def fmt_rate(x):
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def fmt_k(n):
    """4096 -> 4K, 524288 -> 512K, 300 -> 300."""
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def cell(row, measure, notes):
    """Table cell of one measure: 'ms (rate)', or the failure label with a footnote number."""
    if row is None:
        return ""
    v = row.get(f"{measure}_ms")
    if v is not None:
        s = fmt_ms(v)
        if row.get("flops") and row["group"] != "decode":
            s += f" ({fmt_rate(row['flops'] * FLOP_MULT[measure] / v * 1e-9)})"
        elif row.get("bytes_moved") and measure == "fwd":
            s += f" ({fmt_rate(row['bytes_moved'] / v * 1e-6)} GB/s)"
        if measure == "bwd" and any("bwd = fwd+bwd - fwd" in n for n in row.get("notes", [])):
            s += "*"
        return s
    return fail_cell(row, measure, notes)


def fail_cell(row, measure, notes):
    f = row.get("fail", {}).get(measure)
    if f is None:
        return "-"
    if f == "n/a":
        return "n/a"
    label = SHORT_FAIL.get(f, f)
    msg = "; ".join(n for n in row.get("notes", []) if "max|diff|" not in n)
    if f in ("error", "wrong", "unsupported") and msg:
        if msg not in notes:
            notes.append(msg)
        return f"{label} [{notes.index(msg) + 1}]"
    return label


def mem_cell(row, notes):
    if row is None:
        return ""
    parts = []
    for m in ("peak_fwd", "peak_fwdbwd"):
        v = row.get(f"{m}_mb")
        if v is not None:
            parts.append(f"{v:,.0f}")
        elif m == "peak_fwdbwd" and row["group"] == "decode":
            continue
        else:
            f = row.get("fail", {}).get(m)
            parts.append(SHORT_FAIL.get(f, f) if f else "-")
    s = " / ".join(parts)
    if row.get("aux_mb"):
        s += f" (+{row['aux_mb']:,.0f})"
    return s


def describe(spec, density):
    g = spec["group"]
    if g in DENSE_GROUPS:
        cap = f" softcap {spec['softcap']:g}" if spec.get("softcap") else ""
        return (f"{'causal' if spec['causal'] else 'non-causal'} D={spec['D']} S={fmt_k(spec['S'])}"
                f"{cap} ({spec['B']},{spec['S']},{spec['H']},{spec['Hk']},{spec['D']})")
    if g == "trainable":
        d = f", density {100 * density:.1f}%" if density is not None else ""
        return f"S={fmt_k(spec['S'])}{d} ({spec['B']},{spec['S']},{spec['H']},{spec['Hk']},{spec['D']})"
    if g == "reference":
        d = f", density {100 * density:.2f}%" if density is not None else ""
        return f"S={spec['S']}{d}"
    return f"Sk={fmt_k(spec['Sk'])} ({spec['B']},1,{spec['Sk']},{spec['H']},{spec['Hk']},{spec['D']})"


def sort_key(spec, density):
    g = spec["group"]
    if g in DENSE_GROUPS:
        return (not spec["causal"], spec["D"], spec["S"])
    if g == "trainable":
        return (spec["S"], density or 0)
    if g == "reference":
        return (spec["S"],)
    return (spec["Sk"],)


def workloads_of(rows, group):
    """[(workload key, spec, density, {impl: row})] sorted, for one group. Density-independent
    rows (masked SDPA in the trainable group) are listed under the workload they ran on."""
    by = {}
    for r in rows.values():
        if r.get("group") != group:
            continue
        w = by.setdefault(r["workload"], [r["spec"], None, {}])
        if r["impl"] == "ours" or w[1] is None:
            w[1] = r.get("density", w[1])
        w[2][r["impl"]] = r
    out = [(k, s, d, impls) for k, (s, d, impls) in by.items()]
    out.sort(key=lambda t: sort_key(t[1], t[2]))
    return out


def impls_present(wls):
    present = {i for _, _, _, impls in wls for i in impls}
    return [i for i in IMPL_ORDER if i in present]


# ------------------------------------------------------------------------------------------------
# Markdown


def group_tables(group, rows, lines):
    wls = workloads_of(rows, group)
    if not wls:
        return
    impls = impls_present(wls)
    notes = []
    lines.append(f"### {GROUP_TITLES[group]}")
    lines.append("")
    rate = "GB/s of kept K+V" if group == "decode" else "TFLOP/s over kept entries"
    measures = ["fwd"] if group == "decode" else ["fwd", "bwd", "fwdbwd"]
    header = "| workload | " + " | ".join(LABELS[i] for i in impls) + " |"
    sep = "|---|" + "---|" * len(impls)
    def all_na(fn):
        return all(fn(by.get(i)) in ("", "n/a", "n/a / n/a") for _, _, _, by in wls for i in impls)

    for m in measures:
        if all_na(lambda r: cell(r, m, [])):
            continue
        lines.append(f"{MEASURE_TITLES[m]}, ms ({rate}):")
        lines.append("")
        lines.append(header)
        lines.append(sep)
        for _, spec, dens, by in wls:
            lines.append(f"| {describe(spec, dens)} | "
                         + " | ".join(cell(by.get(i), m, notes) for i in impls) + " |")
        lines.append("")
    what = "forward" if group == "decode" else "forward / forward+backward"
    if all_na(lambda r: mem_cell(r, [])):
        what = None
    if what:
        lines.append(f"Peak memory, {what}, MiB beyond what existed before the call (+ masks "
                     "or lists the implementation needs besides q, k, v, bias):")
        lines.append("")
        lines.append(header)
        lines.append(sep)
        for _, spec, dens, by in wls:
            lines.append(f"| {describe(spec, dens)} | "
                         + " | ".join(mem_cell(by.get(i), notes) for i in impls) + " |")
        lines.append("")
    compiles = [(describe(s, d), by["flex"]) for _, s, d, by in wls
                if "flex" in by and "first_call_s" in by["flex"]]
    if compiles:
        parts = []
        for desc, r in compiles:
            t = f"{r['first_call_s']:.1f} s"
            if "first_train_s" in r:
                t += f" / {r['first_train_s']:.1f} s"
            parts.append(f"{desc.split(' (')[0]}: {t}")
        lines.append("FlexAttention's first call (compilation included; forward / forward+backward; "
                     "not part of the medians): " + "; ".join(parts) + ".")
        lines.append("")
    if any(r.get("density_independent") for _, _, _, by in wls for r in by.values()):
        lines.append("The masked SDPA peers compute every entry whatever the mask keeps: they ran "
                     "once per S (on the workload listed) and cost the same at every density.")
        lines.append("")
    if notes:
        for i, n in enumerate(notes, 1):
            lines.append(f"[{i}] {n}")
            lines.append("")


def workload_cell(row, measure):
    """A workload-group table cell: 'ms (rate)' (MiB for peak memory), the failure label, or
    empty when not measured; failure messages are in the row's notes."""
    if measure == "peak_fwdbwd":
        v = row.get("peak_fwdbwd_mb")
        if v is not None:
            return f"{v:,.0f}"
    elif row.get(f"{measure}_ms") is not None:
        return cell(row, measure, [])
    f = row.get("fail", {}).get(measure)
    return SHORT_FAIL.get(f, f) if f else ""


def workload_notes(row):
    """The notes column: the row's notes, then its derived numbers (markdown-safe)."""
    parts = list(row.get("notes", []))
    parts += [f"{k} {v:.3g}" for k, v in row.get("extra", {}).items()]
    return "; ".join(parts).replace("|", "\\|")


WORKLOAD_MEASURES = (("fwd", "forward, ms"), ("fwdbwd", "forward + backward, ms"),
                     ("peak_fwdbwd", "peak fwd+bwd, MiB"))


def workload_group_tables(group, rows, lines):
    """A workload group's section: per workload, in the order of the files, a table of its rows
    (implementations, then ratios) with the measures any of them has and the notes."""
    by = {}
    for r in rows.values():
        if r.get("group") == group:
            by.setdefault(r["workload"], []).append(r)
    if not by:
        return
    lines.append(f"### {GROUP_TITLES[group]}")
    lines.append("")
    rate = ("GB/s of kept K+V (SDPA over all keys: of all K+V; device copy: read + written)"
            if group in ("kvcache", "decode_bars") else
            "TFLOP/s over kept entries, forward + backward counted 3.5x the forward")
    lines.append(f"In parentheses: {rate}.")
    lines.append("")
    for wkey, impl_rows in by.items():
        measures = [(m, title) for m, title in WORKLOAD_MEASURES
                    if any(workload_cell(r, m) for r in impl_rows)]
        title = impl_rows[0]["spec"].get("title", wkey)
        # (the keys of converted compare.py rows end in their title)
        lines.append(f"{title}:" if wkey.endswith(title) else f"{title} (`{wkey}`):")
        lines.append("")
        lines.append("| implementation | " + "".join(f"{t} | " for _, t in measures) + "notes |")
        lines.append("|---|" + "---|" * len(measures) + "---|")
        for r in impl_rows:
            lines.append(f"| {r['label']} | "
                         + "".join(f"{workload_cell(r, m)} | " for m, _ in measures)
                         + f"{workload_notes(r)} |")
        lines.append("")


def runs_table(runs, lines):
    lines.append("| file | card | date | torch | triton | flash_sparse_attn (git) | command |")
    lines.append("|---|---|---|---|---|---|---|")
    seen = set()
    for r in runs:
        ident = (r.get("file"), r.get("date"), r.get("command"))
        if ident in seen:
            continue
        seen.add(ident)
        ver = r.get("flash_sparse_attn") or "-"
        if r.get("git"):
            ver += f" ({r['git']})"
        lines.append(f"| `{os.path.basename(r['file'])}` | {r.get('device') or '-'} | "
                     f"{r.get('date') or '-'} | {r.get('torch') or '-'} | {r.get('triton') or '-'} | "
                     f"{ver} | `{r.get('command') or '-'}` |")
    lines.append("")


def perf_section(paths, runs, rows, plots, plots_rel):
    lines = [BEGIN_PERF, "", "## Comparison sweep (generated)", ""]
    lines.append("This section is written by `python3 bench/report.py "
                 + " ".join(os.path.basename(p) for p in paths)
                 + "` from the JSON results of the runs below (`bench/sweep.py` through "
                 "`scripts/gpu_check.sh --sweep`, or the older `bench/compare.py`); edit the "
                 "script, not this text.")
    lines.append("")
    runs_table(runs, lines)
    lines.append(
        "How to read it: medians in ms (CUDA events after warmup, L2 flushed before every rep: "
        "a 256 MiB buffer zeroed, then read, so that no write-back of the flush lands in the timed "
        "call; runs before 2026-12-03, and commands with `--flush zero`, only zeroed it), "
        "bf16; in parentheses TFLOP/s over the entries the mask keeps (backward counted as 2.5x "
        "and forward+backward as 3.5x the forward's flops), for decode GB/s of kept K+V. The "
        "backward is timed alone through a retained graph (`*`: derived as fwd+bwd - fwd where "
        "the graph could not be retained). Every peer's output was checked against ours (ours "
        "against float64 on sampled rows) before it was timed; gradients too. OOM = out of "
        "memory, unsup. = not supported by that implementation, err / wrong = failed or "
        "mismatched (note below the table), n/a = not measured (decode is inference only; the "
        "older compare.py format has no backward-alone or memory numbers).")
    if any(r.get("legacy") for r in runs):
        lines.append("")
        lines.append("Files in the older `bench/compare.py` format were timed without the L2 "
                     "flush (except its decode and kvcache groups), their dense, trainable and "
                     "decode peers checked on forward outputs only (not gradients), and carry "
                     "forward and forward+backward times only.")
    lines.append("")
    for name in plots:
        lines.append(f"![{name}]({plots_rel}/{name})")
        lines.append("")
    for g in ENTRY_GROUPS:
        group_tables(g, rows, lines)
    for g in WORKLOAD_GROUPS:
        workload_group_tables(g, rows, lines)
    lines.append(END)
    return "\n".join(lines) + "\n"


def pick(wls, group):
    """The representative workload of a group for the headline."""
    if not wls:
        return None
    if group == "dense":
        c = [w for w in wls if w[1]["causal"] and w[1]["D"] == 128] or wls
        return max(c, key=lambda w: w[1]["S"])
    if group == "trainable":
        S = min({w[1]["S"] for w in wls}, key=lambda s: abs(s - 16384))
        c = [w for w in wls if w[1]["S"] == S]
        return min(c, key=lambda w: abs((w[2] or 0) - 0.1))
    if group == "reference":
        return max(wls, key=lambda w: w[1]["S"])
    return max(wls, key=lambda w: w[1]["Sk"])


def best_sdpa(by, measure):
    """The fastest checked SDPA variant of a workload for a measure: (row, id) or a failure row."""
    cands = [(i, r) for i, r in by.items() if i.startswith("sdpa") and i != "sdpa_flash_dense"]
    ok = [(r[f"{measure}_ms"], i, r) for i, r in cands if r.get(f"{measure}_ms") is not None]
    if ok:
        _, i, r = min(ok, key=lambda t: t[0])
        return r, i
    return (cands[0][1], cands[0][0]) if cands else (None, None)


def readme_block(runs, rows, plot, plots_rel_readme):
    lines = [BEGIN_README, "", "### Headline numbers (generated by bench/report.py)", ""]
    devices = sorted({r.get("device") for r in runs if r.get("device")})
    dates = sorted({(r.get("date") or "")[:10] for r in runs if r.get("date")})
    lines.append(f"Medians in ms on {', '.join(devices) or '?'} ({', '.join(dates) or '?'}), bf16, "
                 "every peer checked against ours before timing; all workloads, peak memory and "
                 "the exact commands in [docs/perf.md](docs/perf.md).")
    lines.append("")
    picks = [(g, pick(workloads_of(rows, g), g)) for g in GROUPS]
    picks = [(g, w) for g, w in picks if w is not None]
    if picks:
        lines.append("| workload | pass | flash_sparse_attn | best SDPA (backend) | "
                     "FlexAttention |")
        lines.append("|---|---|---|---|---|")
    else:
        lines.append(f"(No {', '.join(GROUPS)} results in these files.)")
    notes = []
    for g, w in picks:
        _, spec, dens, by = w
        name = {"dense": "dense", "trainable": "trainable mask", "reference": "reference config",
                "decode": "decode"}[g]
        for m in (["fwd"] if g == "decode" else ["fwd", "fwdbwd"]):
            sd, sid = best_sdpa(by, m)
            sd_cell = "-" if sd is None else cell(sd, m, notes)
            if sd is not None and sd.get(f"{m}_ms") is not None:
                sd_cell = f"{LABELS[sid].replace('SDPA ', '')}: {sd_cell}"
            lines.append(f"| {name}: {describe(spec, dens)} | {MEASURE_TITLES[m].lower()} | "
                         f"{cell(by.get('ours'), m, notes) or '-'} | {sd_cell} | "
                         f"{cell(by.get('flex'), m, notes) or '-'} |")
    lines.append("")
    lines.append("In parentheses after a time: TFLOP/s over kept entries (decode: GB/s of kept K+V).")
    lines.append("")
    for i, n in enumerate(notes, 1):
        lines.append(f"[{i}] {n[:200]}")
        lines.append("")
    if plot:
        lines.append(f"![{plot}]({plots_rel_readme}/{plot})")
        lines.append("")
    lines.append(END)
    return "\n".join(lines) + "\n"


def replace_block(text, begin, new_block, where):
    """Replaces begin..END in text by new_block; when absent, inserts it by where(text)."""
    start = text.find(begin)
    if start >= 0:
        stop = text.find(END, start)
        if stop < 0:
            raise ReportError(f"marker {begin!r} has no matching {END!r}")
        stop += len(END)
        if text[stop:stop + 1] == "\n":
            stop += 1
        return text[:start] + new_block + text[stop:]
    return where(text, new_block)


def append_at_end(text, block):
    return text.rstrip("\n") + "\n\n" + block


def after_status(text, block):
    """Inserts before the first level-2 heading after '## Status' (else at the end)."""
    m = re.search(r"^## Status\b", text, re.M)
    if not m:
        return append_at_end(text, block)
    nxt = re.search(r"^## ", text[m.end():], re.M)
    if not nxt:
        return append_at_end(text, block)
    pos = m.end() + nxt.start()
    return text[:pos] + block + "\n" + text[pos:]


# ------------------------------------------------------------------------------------------------
# Plots


def series(wls, impl, measure, x_of):
    xs, ys = [], []
    for _, spec, dens, by in wls:
        r = by.get(impl)
        if r is not None and r.get(f"{measure}_ms") is not None:
            xs.append(x_of(spec, dens))
            ys.append(r[f"{measure}_ms"])
    return xs, ys


def failed_label(wls, impl, measure):
    fails = sorted({SHORT_FAIL.get(by[impl]["fail"].get(measure), "")
                    for _, _, _, by in wls if impl in by and by[impl].get(f"{measure}_ms") is None
                    and by[impl].get("fail", {}).get(measure) not in (None, "n/a")})
    if not fails:
        return ""
    some = any(by.get(impl, {}).get(f"{measure}_ms") is not None for _, _, _, by in wls)
    return f" ({'/'.join(f for f in fails if f)}{' at some sizes' if some else ''})"


def shape_of(wls, seq="S"):
    s = wls[0][1]
    return f"({s['B']}, {'1, Sk' if seq == 'Sk' else 'S'}, {s['H']}, {s['Hk']}, {s['D']})"


STYLE = {"ours": dict(color="C3", marker="o", lw=2.2), "flex": dict(color="C0", marker="s"),
         "sdpa_flash": dict(color="C2", marker="^"), "sdpa_cudnn": dict(color="C1", marker="v"),
         "sdpa_eff_mask": dict(color="C2", marker="^", ls="--"),
         "sdpa_cudnn_mask": dict(color="C1", marker="v", ls="--"),
         "sdpa_math_mask": dict(color="C4", marker="x", ls="--"),
         "sdpa_flash_dense": dict(color="C7", marker=".", ls=":")}


def subtitle(runs):
    devices = sorted({r.get("device") for r in runs if r.get("device")})
    dates = sorted({(r.get("date") or "")[:10] for r in runs if r.get("date")})
    return f"{', '.join(devices)}, {', '.join(dates)}, bf16"


def make_plots(rows, runs, outdir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(outdir, exist_ok=True)
    made = []
    sub = subtitle(runs)

    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda y, _: f"{y:g}")

    def save(fig, name):
        for ax in fig.axes:          # plain numbers on log axes (no 1.6 x 10^0 ticks)
            if ax.get_yscale() == "log":
                ax.yaxis.set_major_formatter(plain)
                ax.yaxis.set_minor_formatter(plain)
                ax.tick_params(axis="y", which="minor", labelsize=7)
            if ax.get_xscale() == "log":
                ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: fmt_k(int(round(x)))))
        fig.tight_layout()
        fig.savefig(os.path.join(outdir, name), dpi=110, bbox_inches="tight")
        plt.close(fig)
        made.append(name)

    # 1. trainable: time vs density per S, forward and forward+backward
    wls = workloads_of(rows, "trainable")
    seqs = sorted({w[1]["S"] for w in wls})
    if wls:
        fig, axes = plt.subplots(2, len(seqs), figsize=(4.6 * len(seqs), 7.5), squeeze=False)
        for col, S in enumerate(seqs):
            ws = [w for w in wls if w[1]["S"] == S]
            for row_i, m in enumerate(("fwd", "fwdbwd")):
                ax = axes[row_i][col]
                for impl in impls_present(ws):
                    xs, ys = series(ws, impl, m, lambda s, d: 100 * (d or 0))
                    label = LABELS[impl] + failed_label(ws, impl, m)
                    st = STYLE.get(impl, {})
                    flat = any(by.get(impl, {}).get("density_independent") for _, _, _, by in ws)
                    if flat and ys:
                        ax.axhline(ys[0], color=st.get("color"), ls="--",
                                   label=label + " (any density)")
                    elif xs:
                        ax.plot(xs, ys, label=label, **st)
                    elif label != LABELS[impl]:
                        ax.plot([], [], label=label, **st)
                ax.set_yscale("log")
                ax.set_xlim(0, 55)
                ax.set_xlabel("kept entries, % of S x S")
                ax.set_ylabel(f"{MEASURE_TITLES[m].lower()}, ms")
                ax.set_title(f"S = {fmt_k(S)}: {MEASURE_TITLES[m].lower()}", fontsize=10)
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=7)
        fig.suptitle(f"Trainable mask {shape_of(wls)}, time vs density ({sub})", fontsize=11)
        save(fig, "trainable_density.png")

    # 2. time vs sequence length: the reference configuration
    wls = workloads_of(rows, "reference")
    if wls:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
        for ax, m in zip(axes, ("fwd", "fwdbwd")):
            for impl in impls_present(wls):
                xs, ys = series(wls, impl, m, lambda s, d: s["S"])
                ax.plot(xs, ys, label=LABELS[impl] + failed_label(wls, impl, m),
                        **STYLE.get(impl, {}))
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length S")
            ax.set_ylabel(f"{MEASURE_TITLES[m].lower()}, ms")
            ax.set_title(MEASURE_TITLES[m], fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"Reference configuration {shape_of(wls)}, causal, top-"
                     f"{wls[0][1].get('window', '?')} keys per query ({sub})", fontsize=10)
        save(fig, "reference_seqlen.png")

    # 3. dense: TFLOP/s bars per workload
    wls = workloads_of(rows, "dense")
    if wls:
        impls = impls_present(wls)
        fig, axes = plt.subplots(2, 1, figsize=(max(7, 1.3 * len(wls) * max(1, len(impls)) / 2.5), 7))
        width = 0.8 / max(1, len(impls))
        for ax, m in zip(axes, ("fwd", "fwdbwd")):
            for j, impl in enumerate(impls):
                xs, ys = [], []
                for i, (_, spec, dens, by) in enumerate(wls):
                    r = by.get(impl)
                    if r and r.get(f"{m}_ms") and r.get("flops"):
                        xs.append(i + (j - (len(impls) - 1) / 2) * width)
                        ys.append(r["flops"] * FLOP_MULT[m] / r[f"{m}_ms"] * 1e-9)
                ax.bar(xs, ys, width, label=LABELS[impl] + failed_label(wls, impl, m),
                       color=STYLE.get(impl, {}).get("color"))
            ax.set_xticks(range(len(wls)))
            ax.set_xticklabels([describe(s, d).split(" (")[0].replace(" S=", "\nS=")
                                for _, s, d, _ in wls], fontsize=7)
            ax.set_ylabel(f"{MEASURE_TITLES[m].lower()}, TFLOP/s")
            ax.grid(True, axis="y", alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"Dense attention, TFLOP/s ({sub})", fontsize=11)
        save(fig, "dense_tflops.png")

    # 4. decode: time vs Sk
    wls = workloads_of(rows, "decode")
    if wls:
        fig, ax = plt.subplots(figsize=(6.5, 4.3))
        for impl in impls_present(wls):
            xs, ys = series(wls, impl, "fwd", lambda s, d: s["Sk"])
            ax.plot(xs, ys, label=LABELS[impl] + failed_label(wls, impl, "fwd"),
                    **STYLE.get(impl, {}))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("keys Sk")
        ax.set_ylabel("forward, ms")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(f"Decode {shape_of(wls, 'Sk')}, 1/{wls[0][1].get('keep_every', '?')} of "
                     f"key blocks kept\n({sub})",
                     fontsize=10)
        save(fig, "decode_sk.png")
    return made


def headline_plot(rows, made):
    """trainable vs density when several densities exist, else the first other plot made."""
    dens = {w[2] for w in workloads_of(rows, "trainable")}
    prefs = (["trainable_density.png"] if len(dens) > 1 else []) + [
        "reference_seqlen.png", "dense_tflops.png", "decode_sk.png", "trainable_density.png"]
    for p in prefs:
        if p in made:
            return p
    return None


# ------------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+",
                    help="JSON results (bench/sweep.py, or the former bench/compare.py)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--perf", default=os.path.join(root, "docs", "perf.md"))
    ap.add_argument("--readme", default=os.path.join(root, "README.md"))
    ap.add_argument("--plots", default=os.path.join(root, "docs", "plots"))
    ap.add_argument("--no-plots", action="store_true", help="skip the PNGs (no matplotlib needed)")
    ap.add_argument("--stdout", action="store_true",
                    help="print both generated blocks instead of writing perf.md and README.md")
    args = ap.parse_args(argv)
    for path, what in ((args.perf, "--perf"), (args.readme, "--readme")):
        if not args.stdout and not os.path.isfile(path):
            ap.error(f"{what}: expected an existing markdown file, got {path!r}")
    try:
        runs, rows = load(args.files)
    except ReportError as e:
        ap.error(str(e))
    if not rows:
        ap.error(f"no result rows in {', '.join(args.files)}")
    made = [] if args.no_plots else make_plots(rows, runs, args.plots)
    perf_dir = os.path.dirname(os.path.abspath(args.perf))
    readme_dir = os.path.dirname(os.path.abspath(args.readme))
    plots_abs = os.path.abspath(args.plots)
    perf_block = perf_section(args.files, runs, rows, made, os.path.relpath(plots_abs, perf_dir))
    readme = readme_block(runs, rows, headline_plot(rows, made),
                          os.path.relpath(plots_abs, readme_dir))
    if args.stdout:
        sys.stdout.write(perf_block + "\n" + readme)
        return 0
    try:
        for path, begin, block, where in ((args.perf, BEGIN_PERF, perf_block, append_at_end),
                                          (args.readme, BEGIN_README, readme, after_status)):
            with open(path) as f:
                text = f.read()
            new = replace_block(text, begin, block, where)
            with open(path, "w") as f:
                f.write(new)
    except ReportError as e:
        ap.error(str(e))
    print(f"report: {len(rows)} entries from {len(args.files)} file(s); wrote {args.perf}, "
          f"{args.readme}" + (f", {len(made)} plots in {args.plots}" if made else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
