"""Where a kernel's stalls and instructions go per CUDA source line, from Nsight Compute.

    ncu -i prof.ncu-rep --page source --csv --print-source cuda,sass > src.csv
    python benchmarks/ncu_cuda_lines.py src.csv [--top 45]

The page lists, per source file ("File Path" rows), one row per source line (line number,
text, stall samples, instructions executed, ...) followed by its SASS rows. Lines inlined
in several places add up. Prints the top lines by stall samples and by instructions.
"""
import argparse
import collections
import csv
import gzip
import os


def num(text: str) -> int:
    try:
        return int(text.replace(",", ""))
    except ValueError:  # "-" where a line has no samples
        return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", help="the source page as CSV (.gz allowed)")
    ap.add_argument("--top", type=int, default=45)
    args = ap.parse_args()
    opener = gzip.open if args.csv.endswith(".gz") else open
    with opener(args.csv, "rt", errors="replace") as f:
        rows = list(csv.reader(f))
    stalls, instr = collections.Counter(), collections.Counter()
    path, cols = None, None
    for r in rows:
        if r[:1] == ["File Path"]:
            path = os.path.basename(r[1])
        elif r[:2] == ["Line No", "Source"]:
            cols = (r.index("Warp Stall Sampling (All Samples)"), r.index("Instructions Executed"))
        elif path and cols and r and r[0].isdigit() and len(r) > max(cols):
            key = (path, int(r[0]), r[1].strip()[:100])
            stalls[key] += num(r[cols[0]])
            instr[key] += num(r[cols[1]])
    ts, ti = sum(stalls.values()) or 1, sum(instr.values()) or 1
    print(f"{ts} stall samples, {ti} warp instructions over {len(stalls)} source lines")
    for title, order in (("by stall samples", stalls), ("by instructions executed", instr)):
        print(f"\ntop {args.top} {title}:  stall%  instr%  file:line  source")
        for key, _ in order.most_common(args.top):
            print(f"{100 * stalls[key] / ts:6.1f}  {100 * instr[key] / ti:6.1f}  {key[0]}:{key[1]}  {key[2]}")


if __name__ == "__main__":
    main()
