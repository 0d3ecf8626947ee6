"""Top source lines of an Nsight Compute source-page CSV by a metric (default: warp stall samples).

    ncu -i prof.ncu-rep --page source --csv --print-source cuda > src.csv
    python benchmarks/ncu_top_lines.py src.csv [--metric "Warp Stall Sampling (All"] [--top 40]
"""
import argparse
import csv
import io
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--metric", default="Warp Stall Sampling (All")
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()
    text = open(args.csv, errors="replace").read()
    start = text.find('"#"') if '"#"' in text else text.find('"')
    rows = list(csv.reader(io.StringIO(text[max(start, 0):])))
    header = rows[0]
    print("columns:", " | ".join(header), file=sys.stderr)
    cols = [i for i, h in enumerate(header) if h.startswith(args.metric)]
    inst = [i for i, h in enumerate(header) if h.startswith("Instructions Executed")]
    src = [i for i, h in enumerate(header) if h in ("Source", "Source Line", "Address Source")] or [1]

    def num(r, i):
        try:
            return float(r[i].replace(",", ""))
        except (ValueError, IndexError):
            return 0.0

    body = [r for r in rows[1:] if len(r) == len(header)]
    total = sum(num(r, cols[0]) for r in body) or 1.0
    itotal = sum(num(r, inst[0]) for r in body) if inst else 0.0
    for r in sorted(body, key=lambda r: -num(r, cols[0]))[:args.top]:
        share = 100 * num(r, cols[0]) / total
        ishare = 100 * num(r, inst[0]) / itotal if itotal else 0.0
        print(f"{share:5.1f}% stalls {ishare:5.1f}% instr | {r[0]:>5} {r[src[0]].strip()[:110]}")


if __name__ == "__main__":
    main()
