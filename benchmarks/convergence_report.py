"""The convergence campaign's tables and plots, from its finished runs (convergence_campaign.py).

`tables(camp)`: the regime table, every LR sweep, parity with the authors' package, alpha and
the quality-memory dial, as dicts (kept in campaign.json); `markdown(camp, tables)` and
`plots(camp, tables)` render them (campaign.md, campaign_regimes.png, campaign_dial.png).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from convergence_campaign import best_lr, done, gap, their_topk_block

if TYPE_CHECKING:
    from convergence_campaign import Campaign

WITHIN = 0.02  # the dial's target: held-out loss within 2% of the best AdamW's


def dial(camp: Campaign) -> dict:
    """The dial's settings in its regime, each at its best LR, sorted by state bytes
    per parameter (settings without a finished run last); the cheapest within WITHIN of the best
    AdamW, and the steps of the frontier (each setting better than every cheaper one)."""
    regime = tuple(camp.args.dial_regime)
    adamw = camp.best(regime, "adamw")[1]
    base = camp.best(regime, "microadam")[1]
    rows = []
    for name in ("microadam", *camp.args.dial):
        tried = camp.grid(regime, name)
        lr, row = camp.best(regime, name)
        d = {"name": name, "label": next((r["label"] for r in tried.values()), name), "lr": lr,
             "losses": {f"{x:g}": r["final_eval_loss"] if done(r) else None for x, r in sorted(tried.items())},
             "loss": None, "gap_to_best_adamw": None, "bytes_per_param": None, "vs_base": None, "frontier_step": None}
        if done(row):
            d.update(loss=row["final_eval_loss"], gap_to_best_adamw=gap(row, adamw),
                     bytes_per_param=row["state_bytes_per_param"], vs_base=gap(row, base))
        rows.append(d)
    rows.sort(key=lambda d: (d["bytes_per_param"] is None, d["bytes_per_param"] or 0.0, d["loss"] or math.inf))
    prev = None
    for d in rows:
        if d["loss"] is not None and (prev is None or d["loss"] < prev["loss"]):
            d["frontier_step"] = {"first": True} if prev is None else {
                "gap_change": (d["loss"] - prev["loss"]) / adamw["final_eval_loss"] if done(adamw) else None,
                "bytes_added": d["bytes_per_param"] - prev["bytes_per_param"]}
            prev = d
    cheapest = next((d for d in rows if d["gap_to_best_adamw"] is not None and d["gap_to_best_adamw"] <= WITHIN), None)
    closest = min((d for d in rows if d["gap_to_best_adamw"] is not None), key=lambda d: d["gap_to_best_adamw"],
                  default=None)
    return {"weights": regime[0], "start": regime[1], "adamw": adamw and adamw.get("final_eval_loss"),
            "lr_factors": list(camp.args.dial_lr_factors), "rows": rows, "cheapest_within": cheapest and cheapest["name"],
            "closest": closest and closest["name"]}


def tables(camp: Campaign) -> dict:
    """The regime table, LR sweeps, parity, alpha and dial rows, from the finished runs."""
    out = {"regimes": [], "sweeps": [], "parity": [], "alpha": [], "dial": dial(camp)}
    for regime in map(tuple, camp.args.regimes):
        w, s = regime
        lr_a, adamw = camp.best(regime, "adamw")
        lr_m, ours = camp.best(regime, "microadam")
        lr_i, ista = camp.best(regime, "ista")
        sr_row = camp.grid(regime, "microadam_sr").get(lr_m)  # at ours' best LR
        start = camp.results["starts"].get(s, {})
        out["regimes"].append({
            "weights": w, "start": s, "pretrain_steps": start.get("steps"),
            "start_last_fifth_gain": start.get("last_fifth_gain"), "start_plateau": start.get("plateau"),
            "adamw": adamw and adamw.get("final_eval_loss"), "adamw_lr": lr_a,
            "microadam": ours and ours.get("final_eval_loss"), "microadam_lr": lr_m,
            "microadam_sr": sr_row.get("final_eval_loss") if done(sr_row) else None,
            "microadam_sr_lr": sr_row and lr_m,
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
            if (row["weights"], row["start"]) == regime and done(row) and "alpha=" in row["name"]:
                base = camp.grid(regime, "microadam").get(row["lr"])
                out["alpha"].append({"weights": w, "start": s, "name": row["name"], "lr": row["lr"],
                                     "loss": row["final_eval_loss"], "without_alpha": base and base["final_eval_loss"],
                                     "change": gap(row, base)})
    return out


def _f(x, spec=".4f"):
    return "-" if x is None else format(x, spec)


def _pct(x, spec="+.1f"):
    """A fraction as a percentage ("-" for None)."""
    return "-" if x is None else format(100 * x, spec) + "%"


def _start_line(name: str, st: dict) -> str:
    if not st:
        return f"{name} start: not trained."
    plateau = ("reached the plateau (< 1%)" if st["plateau"] else
               f"did not reach the plateau (stopped: {st['stopped']})")
    return (f"{name} start: {st['steps']} AdamW steps of {st['batch']} sequences ({st['schedule_steps']} on the "
            f"schedule), held-out loss {st['pretrain_eval_loss']:.4f}, "
            f"last-fifth gain {_pct(st['last_fifth_gain'], '.2f')}"
            + (f": {plateau}." if name == "Well-trained" else "."))


def header(camp: Campaign) -> list[str]:
    """What was run: model, device, fine-tunes, processes, pace and the starts."""
    r, a = camp.results, camp.args
    steps, asked = r["finetune_steps"], r["args"]["finetune_steps"]
    probe = r.get("probe")
    paces = probe and probe["seconds_per_step"].items()
    pace = ("; probe: " + ", ".join(f"{k} {sum(v) / len(v):.4f} s/step" for k, v in paces)
            + f" with {probe['runs_side_by_side']} runs side by side" if probe else "")
    return [f"Model {a.size} ({r['params'] / 1e6:.1f} M-parameter byte-level Llama) on {r['device']}; pre-trained on "
            f"'{r['pretrain_corpus']}', fine-tuned on '{r['finetune_corpus']}' for {steps} steps of "
            f"{a.batch}x{a.seq_len} tokens (batch seed {a.finetune_seed})"
            + (f" (asked: {asked}; fewer to fit the deadline)" if steps != asked else "")
            + "; held-out loss at the end. Fine-tunes: " + (f"{r['workers']} processes side by side"
                                                             if r["workers"] > 1 else "1 process")
            + f", {r['threads']} torch thread(s) each{pace}; {r.get('elapsed_s', camp.elapsed()):.0f} s in all.", "",
            _start_line("Well-trained", r["starts"].get("well")) + " " + _start_line("Weak", r["starts"].get("weak")),
            ""]


def dial_lines(d: dict) -> list[str]:
    at = " and ".join(f"{f:g}x" for f in d["lr_factors"])
    lines = [f"| dial ({d['weights']} weights, {d['start']} start): each setting at {at} ours' best LR, the "
             "best counts | held-out loss by LR | best LR | held-out loss | gap to best AdamW | bytes/param "
             "| vs m=10, 1% | frontier step |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for x in d["rows"]:
        losses = ", ".join(f"{lr}: {_f(loss)}" for lr, loss in x["losses"].items()) or "-"
        step = x["frontier_step"]
        # The frontier's steps: what the added bytes bought against the previous setting on it.
        step = ("-" if x["loss"] is None else "dominated" if step is None else "cheapest" if "first" in step else
                f"{_pct(step['gap_change'], '+.2f')} for {step['bytes_added']:+.3f} B")
        lines.append(f"| {x['label']} | {losses} | {_f(x['lr'], 'g')} | {_f(x['loss'])} "
                     f"| {_pct(x['gap_to_best_adamw'])} | {_f(x['bytes_per_param'], '.3f')} "
                     f"| {_pct(x['vs_base'], '+.2f')} | {step} |")
    rows = {x["name"]: x for x in d["rows"]}
    if d["cheapest_within"]:
        c = rows[d["cheapest_within"]]
        lines += ["", f"Cheapest setting within {100 * WITHIN:g}% of the best AdamW ({_f(d['adamw'])}): {c['label']} "
                      f"at LR {c['lr']:g}, {_pct(c['gap_to_best_adamw'])}, {c['bytes_per_param']:.3f} bytes/param."]
    else:
        c = rows.get(d["closest"])
        lines += ["", f"Cheapest setting within {100 * WITHIN:g}% of the best AdamW ({_f(d['adamw'])}): none"
                  + (f"; the closest: {c['label']} at {_pct(c['gap_to_best_adamw'])}, {c['bytes_per_param']:.3f} "
                     "bytes/param." if c else ".")]
    return lines


def markdown(camp: Campaign, t: dict) -> str:
    r = camp.results
    lines = header(camp) + [
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
    lines += [""] + dial_lines(t["dial"])
    skipped = [k for k, row in r["runs"].items() if "skipped" in row]
    if skipped:
        lines += ["", "Skipped: " + "; ".join(f"{k} ({r['runs'][k]['skipped']})" for k in skipped)]
    return "\n".join(lines) + "\n"


def plots(camp: Campaign, t: dict) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out = []

    def save(fig, suffix: str) -> None:
        fig.tight_layout()
        out.append(camp.path(suffix))
        fig.savefig(out[-1], dpi=110)
        plt.close(fig)

    regimes = [tuple(r) for r in camp.args.regimes]
    cols = min(2, len(regimes))
    rows = math.ceil(len(regimes) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat[len(regimes):]:
        ax.set_axis_off()
    for ax, regime in zip(axes.flat, regimes):
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
    save(fig, "_regimes.png")
    points = [d for d in t["dial"]["rows"] if d["gap_to_best_adamw"] is not None]
    if points:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for d in points:
            ax.scatter(d["bytes_per_param"], 100 * d["gap_to_best_adamw"], color="C0" if d["frontier_step"] else "C7")
            ax.annotate(d["label"].replace("MicroAdam ", ""), (d["bytes_per_param"], 100 * d["gap_to_best_adamw"]),
                        fontsize=7)
        front = [(d["bytes_per_param"], 100 * d["gap_to_best_adamw"]) for d in points if d["frontier_step"]]
        ax.plot(*zip(*front), color="C0", lw=1, label="frontier")
        ax.axhline(100 * WITHIN, color="gray", ls="--", lw=1)
        ax.set(xlabel="optimizer state, bytes per parameter", ylabel="held-out loss above best AdamW (%)",
               title=f"quality-memory dial ({t['dial']['weights']} weights, {t['dial']['start']} start)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        save(fig, "_dial.png")
    return out
