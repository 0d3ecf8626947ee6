"""The convergence campaign's tables and plots, from its finished runs (convergence_campaign.py).

`tables(camp)`: the regime table, every LR sweep, parity with the authors' package, alpha and
the quality-memory dial, as dicts (kept in campaign.json); `markdown(camp, tables)` and
`plots(camp, tables)` render them (campaign.md, campaign_regimes.png, campaign_dial.png).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from convergence_campaign import DIAL, REGIMES, best_lr, done, gap, their_topk_block

if TYPE_CHECKING:
    from convergence_campaign import Campaign


def tables(camp: Campaign) -> dict:
    """The regime table, LR sweeps, parity, alpha and dial rows, from the finished runs."""
    out = {"regimes": [], "sweeps": [], "parity": [], "alpha": [], "dial": []}
    for regime in REGIMES:
        w, s = regime
        lr_a, adamw = camp.best(regime, "adamw")
        lr_m, ours = camp.best(regime, "microadam")
        lr_i, ista = camp.best(regime, "ista")
        sr = camp.grid(regime, "microadam_sr")
        sr_row = next(iter(sr.values()), None)
        start = camp.results["starts"].get(s, {})
        out["regimes"].append({
            "weights": w, "start": s, "pretrain_steps": start.get("steps"),
            "start_last_fifth_gain": start.get("last_fifth_gain"),
            "adamw": adamw and adamw.get("final_eval_loss"), "adamw_lr": lr_a,
            "microadam": ours and ours.get("final_eval_loss"), "microadam_lr": lr_m,
            "microadam_sr": sr_row.get("final_eval_loss") if done(sr_row) else None,
            "microadam_sr_lr": sr_row and sr_row["lr"],
            "authors": ista.get("final_eval_loss") if done(ista) else None, "authors_lr": lr_i,
            "gap_microadam": gap(ours, adamw), "gap_microadam_sr": gap(sr_row, adamw), "gap_authors": gap(ista, adamw),
            "bytes_per_param": {k: r["state_bytes_per_param"] for k, r in
                                (("adamw", adamw), ("microadam", ours), ("authors", ista)) if done(r)}})
        for name in ("adamw", "microadam"):
            rows = camp.grid(regime, name)
            lrs = sorted(lr for lr, r in rows.items() if done(r))
            best = best_lr(rows)
            out["sweeps"].append({"weights": w, "start": s, "optimizer": name,
                                  "losses": {f"{lr:g}": rows[lr]["final_eval_loss"] for lr in lrs},
                                  "best_lr": best, "best_at_edge": best in (lrs[0], lrs[-1]) if len(lrs) > 2 else None})
        block = their_topk_block(camp.grid(regime, "ista"))
        for lr, row in sorted(camp.grid(regime, "ista").items()):
            for name in ("microadam", f"microadam/topk_block={block}"):
                ours_at = camp.grid(regime, name).get(lr)
                if done(row) and done(ours_at):
                    out["parity"].append({"weights": w, "start": s, "lr": lr, "ours": ours_at["label"],
                                          "authors": row["final_eval_loss"], "microadam": ours_at["final_eval_loss"],
                                          "diff": gap(ours_at, row)})
        for row in camp.results["runs"].values():
            if (row["weights"], row["start"]) != regime or not done(row):
                continue
            if "alpha=" in row["name"]:
                base = camp.grid(regime, "microadam").get(row["lr"])
                out["alpha"].append({"weights": w, "start": s, "name": row["name"], "lr": row["lr"],
                                     "loss": row["final_eval_loss"], "without_alpha": base and base["final_eval_loss"],
                                     "change": gap(row, base)})
            if row["name"] in DIAL or (regime == ("fp32", "well") and row["name"] in ("microadam", "microadam_sr")
                                       and row["lr"] == lr_m):
                out["dial"].append({"name": row["name"], "label": row["label"], "lr": row["lr"],
                                    "loss": row["final_eval_loss"], "gap_to_best_adamw": gap(row, adamw),
                                    "bytes_per_param": row["state_bytes_per_param"]})
    return out


def _f(x, spec=".4f"):
    return "-" if x is None else format(x, spec)


def _pct(x, spec="+.1f"):
    """A fraction as a percentage ("-" for None)."""
    return "-" if x is None else format(100 * x, spec) + "%"


def markdown(camp: Campaign, t: dict) -> str:
    r = camp.results
    lines = [f"Fine-tuning a {r['params'] / 1e6:.1f} M byte-level Llama on '{r['finetune_corpus']}' after "
             f"pre-training on '{r['pretrain_corpus']}'; {r['device']}; {camp.args.finetune_steps} steps of "
             f"{camp.args.batch}x{camp.args.seq_len} tokens; held-out loss at the end.", "",
             "| weights | start: pre-train steps (last-fifth gain) | AdamW best (LR) | MicroAdam nearest (LR) "
             "| MicroAdam stochastic (LR) | authors' MicroAdam (LR) | gap nearest / stochastic / authors' "
             "| bytes/param AdamW / ours / authors' |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for g in t["regimes"]:
        b = g["bytes_per_param"]
        gain = g["start_last_fifth_gain"]
        lines.append(
            f"| {g['weights']} | {g['start']}: {g['pretrain_steps']} ({_pct(gain, '.2f')}) "
            f"| {_f(g['adamw'])} ({_f(g['adamw_lr'], 'g')}) | {_f(g['microadam'])} ({_f(g['microadam_lr'], 'g')}) "
            f"| {_f(g['microadam_sr'])} ({_f(g['microadam_sr_lr'], 'g')}) | {_f(g['authors'])} ({_f(g['authors_lr'], 'g')}) "
            f"| {_pct(g['gap_microadam'])} / {_pct(g['gap_microadam_sr'])} / {_pct(g['gap_authors'])} "
            f"| {_f(b.get('adamw'), '.2f')} / {_f(b.get('microadam'), '.3f')} / {_f(b.get('authors'), '.3f')} |")
    lines += ["", "| weights | start | optimizer | held-out loss by LR | best LR | best at an edge |",
              "| --- | --- | --- | --- | --- | --- |"]
    for sw in t["sweeps"]:
        losses = ", ".join(f"{lr}: {loss:.4f}" for lr, loss in sw["losses"].items())
        lines.append(f"| {sw['weights']} | {sw['start']} | {sw['optimizer']} | {losses} | {_f(sw['best_lr'], 'g')} "
                     f"| {sw['best_at_edge']} |")
    lines += ["", "| parity: weights, start, LR | authors' MicroAdam | ours | ours vs authors' |", "| --- | --- | --- | --- |"]
    lines += [f"| {p['weights']}, {p['start']}, {p['lr']:g} | {p['authors']:.4f} | {p['ours']}: {p['microadam']:.4f} "
              f"| {_pct(p['diff'], '+.2f')} |" for p in t["parity"]]
    lines += ["", "| alpha: weights, start, LR | with alpha | without | change |", "| --- | --- | --- | --- |"]
    lines += [f"| {x['name']}: {x['weights']}, {x['start']}, {x['lr']:g} | {x['loss']:.4f} "
              f"| {_f(x['without_alpha'])} | {_pct(x['change'], '+.2f')} |" for x in t["alpha"]]
    lines += ["", "| dial (fp32 weights, well-trained start) | LR | held-out loss | gap to best AdamW | bytes/param |",
              "| --- | --- | --- | --- | --- |"]
    lines += [f"| {d['label']} | {d['lr']:g} | {d['loss']:.4f} | {_pct(d['gap_to_best_adamw'])} "
              f"| {d['bytes_per_param']:.3f} |" for d in sorted(t["dial"], key=lambda d: d["bytes_per_param"])]
    skipped = [k for k, row in r["runs"].items() if "skipped" in row]
    if skipped:
        lines += ["", "Skipped: " + "; ".join(f"{k} ({r['runs'][k]['skipped']})" for k in skipped)]
    return "\n".join(lines) + "\n"


def plots(camp: Campaign, t: dict) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out = []
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), squeeze=False)
    for ax, regime in zip(axes.flat, REGIMES):
        for i, name in enumerate(("adamw", "microadam", "microadam_sr", "ista")):
            lr, row = camp.best(regime, name)
            if done(row):
                ev = [(0, camp.results["starts"][regime[1]]["eval_loss_on_finetune_corpus"])]
                ev += [(c["step"], c["eval_loss"]) for c in row["curve"] if "eval_loss" in c]
                ax.plot(*zip(*ev), color=f"C{i}", marker="o", ms=3, label=f"{row['label']} ({row['final_eval_loss']:.4f})")
        start = "well-trained" if regime[1] == "well" else "weakly trained"
        ax.set(title=f"{regime[0]} weights, {start} start", xlabel="step", ylabel="held-out loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.append(os.path.join(camp.args.out, "campaign_regimes.png"))
    fig.savefig(out[-1], dpi=110)
    plt.close(fig)
    if t["dial"]:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for d in t["dial"]:
            if d["gap_to_best_adamw"] is not None:
                ax.scatter(d["bytes_per_param"], 100 * d["gap_to_best_adamw"])
                ax.annotate(d["label"].replace("MicroAdam ", ""), (d["bytes_per_param"], 100 * d["gap_to_best_adamw"]),
                            fontsize=7)
        ax.axhline(2.0, color="gray", ls="--", lw=1)
        ax.set(xlabel="optimizer state, bytes per parameter", ylabel="held-out loss above best AdamW (%)",
               title="quality-memory dial (fp32 weights, well-trained start)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        out.append(os.path.join(camp.args.out, "campaign_dial.png"))
        fig.savefig(out[-1], dpi=110)
        plt.close(fig)
    return out
