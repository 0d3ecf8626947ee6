"""Where a kernel's instructions and stalls go, from Nsight Compute's SASS source page.

    ncu -i prof.ncu-rep --page source --csv --print-source sass > sass.csv
    python benchmarks/ncu_top_lines.py sass.csv [--top 40] [--window 60]

Prints the share of executed instructions and of warp-stall samples per opcode, the
stall reasons, the hottest windows of consecutive SASS instructions (loops show up as
one hot window) and the hottest single instructions.
"""
import argparse
import collections
import csv
import io


def opcode(text: str) -> str:
    words = text.split()
    words = words[1:] if words and words[0].startswith("@") else words  # predicate
    return words[0].split(".")[0] if words else "?"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--window", type=int, default=60)
    args = ap.parse_args()
    rows = list(csv.reader(io.StringIO(open(args.csv, errors="replace").read())))
    head = next(i for i, r in enumerate(rows) if r[:2] == ["Address", "Source"])
    h = rows[head]
    body = [r for r in rows[head + 1:] if len(r) == len(h) and r[0].startswith("0x")]
    S, I = h.index("Warp Stall Sampling (All Samples)"), h.index("Instructions Executed")

    def num(r, i):
        try:
            return float(r[i].replace(",", ""))
        except ValueError:
            return 0.0

    stalls = sum(num(r, S) for r in body) or 1.0
    instr = sum(num(r, I) for r in body) or 1.0
    print(f"{len(body)} SASS instructions, {instr / 1e9:.3f} G warp instructions executed, {stalls:.0f} stall samples")
    by_i, by_s = collections.Counter(), collections.Counter()
    for r in body:
        by_i[opcode(r[1])] += num(r, I)
        by_s[opcode(r[1])] += num(r, S)
    print("opcode      instr%  stall%")
    for op, v in by_i.most_common(15):
        print(f"  {op:<10}{100 * v / instr:6.1f}  {100 * by_s[op] / stalls:6.1f}")
    reasons = [(sum(num(r, i) for r in body), h[i]) for i, name in enumerate(h)
               if name.startswith("stall_") and "Not Issued" not in name]
    print("stall reasons: " + ", ".join(f"{n[6:]} {100 * v / stalls:.1f}%" for v, n in sorted(reasons, reverse=True)[:8]))
    print(f"hottest windows of {args.window} instructions (index range: stall%, instr%, main opcodes):")
    wins = []
    for k in range(0, len(body), args.window):
        seg = body[k:k + args.window]
        wins.append((sum(num(r, S) for r in seg), sum(num(r, I) for r in seg), k))
    for s, i, k in sorted(wins, reverse=True)[:10]:
        ops = collections.Counter(opcode(r[1]) for r in body[k:k + args.window]).most_common(6)
        print(f"  {k:6}-{k + args.window:<6} {100 * s / stalls:5.1f}% {100 * i / instr:5.1f}%  {dict(ops)}")
    print("hottest instructions (stall samples, executed, text):")
    for r in sorted(body, key=lambda r: -num(r, S))[:args.top]:
        print(f"  {int(num(r, S)):>8} {int(num(r, I)):>11}  {r[1].strip()[:90]}")


if __name__ == "__main__":
    main()
