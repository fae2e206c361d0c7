#!/usr/bin/env python3
"""A/B of two builds of flash_sparse_attn on one card: bench/sweep.py results (fsa-sweep/1 JSON)
of a base build and a head build, each run one or more times in alternation (scripts/ab_check.sh
runs them), compared row by row.

For every workload that both sides measured with one of the implementations `--impls` (ours,
and the topk group's in-call selection "topk", by default), and for every time measure (fwd_ms, bwd_ms, fwdbwd_ms), the table gives the best (minimum) of each
side's runs, the spread of each side's runs (max / min - 1: how far two runs of one build
disagree, the noise a difference must exceed), and head / base. A row's peers from the head
runs (SDPA cuDNN, FlexAttention, the reference), where those were measured, follow it as
head / peer ratios, so a bar stays in view: over the head runs that measured that peer alone
(ab_check adds the peers to a head's first run), the best of ours against the best of the peer,
never a better run of ours against a peer measured in another process.

    python3 bench/ab.py --base b1.json b2.json --head h1.json h2.json [--impls ours,topk]
"""

import argparse
import json
import sys

MEASURES = ("fwd_ms", "bwd_ms", "fwdbwd_ms")
# The peers' implementation ids: the entry groups' cuDNN, the topk group's dense cuDNN baseline,
# FlexAttention (both kinds of group) and the topk group's reference kernel.
PEERS = ("sdpa_cudnn", "cudnn", "flex", "ref")


def load(path):
    with open(path) as f:
        data = json.load(f)
    if data.get("format") != "fsa-sweep/1":
        raise SystemExit(f"{path}: not an fsa-sweep/1 file (format {data.get('format')!r})")
    return data


def times(files, impls):
    """{(workload, impl, measure): [ms per file that has it]} of the implementations `impls`."""
    out = {}
    for data in files:
        for row in data["rows"]:
            if row.get("impl") not in impls:
                continue
            for m in MEASURES:
                v = row.get(m)
                if isinstance(v, (int, float)) and m not in row.get("fail", {}):
                    out.setdefault((row["workload"], row["impl"], m), []).append(float(v))
    return out


def times_by_file(files, impls):
    """[{(workload, impl, measure): ms} per file] of the implementations `impls`."""
    return [times([data], impls) for data in files]


def peer_ratio(head_runs, key, peer_key):
    """Best of ours over best of the peer, over the runs that measured both (None: no such run)."""
    pairs = [(run[key][0], run[peer_key][0]) for run in head_runs if key in run and peer_key in run]
    if not pairs:
        return None
    return min(h for h, _ in pairs) / min(p for _, p in pairs)


def spread(values):
    return max(values) / min(values) - 1.0 if len(values) > 1 else float("nan")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", nargs="+", required=True, help="sweep JSONs of the base build")
    ap.add_argument("--head", nargs="+", required=True, help="sweep JSONs of the head build")
    ap.add_argument("--impls", default="ours,topk",
                    help="comma list of the implementations compared (default ours,topk)")
    args = ap.parse_args(argv)
    impls = {i for i in args.impls.split(",") if i}
    base_files = [load(p) for p in args.base]
    head_files = [load(p) for p in args.head]
    base, head = times(base_files, impls), times(head_files, impls)
    head_runs = times_by_file(head_files, impls | set(PEERS))
    keys = [k for k in head if k in base]
    if not keys:
        print(f"no workload measured by both sides for impls {args.impls!r}", file=sys.stderr)
        return 1
    device = head_files[0].get("meta", {}).get("device", "?")
    print(f"A/B on {device}: base {len(base_files)} run(s), head {len(head_files)} run(s); "
          "times are each side's best (ms), spread = max / min - 1 over a side's runs; "
          "head / peer over the head runs that measured the peer")
    print(f"{'workload':50s} {'impl':5s} {'measure':7s} {'base':>9s} {'head':>9s} "
          f"{'head/base':>9s} {'spread b':>8s} {'spread h':>8s}  peers (head / peer)")
    for key in sorted(keys):
        workload, impl, m = key
        b, h = min(base[key]), min(head[key])
        ratios = []
        for p in PEERS:
            r = peer_ratio(head_runs, key, (workload, p, m))
            if r is not None:
                ratios.append(f"{p} {r:.3f}")
        print(f"{workload[:50]:50s} {impl[:5]:5s} {m[:-3]:7s} {b:9.3f} {h:9.3f} {h / b:9.3f} "
              f"{spread(base[key]):8.3f} {spread(head[key]):8.3f}  " + ", ".join(ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
