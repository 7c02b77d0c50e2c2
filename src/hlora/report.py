"""The table of a comparison (``table.csv``, ``table.md``), read from finished run directories.

One row per method: final and best accuracy over seeds (mean ± std, min-max), the final personalised
accuracy (fedsa, or cells run with ``--personal-eval``: each client's model on its held-out share), the
detection record of an ``--attack`` cell (attackers and honest clients rejected, over rounds and seeds),
accuracy at a few fixed rounds, rounds to the target, MB up and down, seconds per round, and against the reference method
(``hlora``) the paired difference over seeds and a paired bootstrap interval over dev examples
(:mod:`hlora.stats`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hlora.metrics import read_predictions, read_rows, scored_rows
from hlora.provenance import code_label
from hlora.stats import Difference, paired_bootstrap, paired_seeds, spread

#: rounds whose accuracy the table shows (those the grid reaches)
FIXED_ROUNDS = (5, 10, 20)
REFERENCE = "hlora"
#: the name of a comparison's table files (table.md, table.csv)
TABLE = "table"


def figure_prefix(name: str) -> str:
    """What the figures of table ``name`` start with: nothing for the grid's own table, ``NAME-`` else."""
    return "" if name == TABLE else f"{name}-"
RESAMPLES = 2000


def _final_correct(cell: Path, rows: list[dict[str, Any]]) -> list[int] | None:
    """Per dev example, 1 if the final round predicted it right: from ``dev_predictions.json`` when it
    belongs to the run's last round (None otherwise: a run from before it was written)."""
    saved = read_predictions(cell)
    if saved is None or not rows or saved["round"] != rows[-1]["round"]:
        return None
    return [int(p == g) for p, g in zip(saved["predicted"], saved["gold"])]


def _summary(cell: Path) -> dict[str, Any]:
    try:
        return json.loads((cell / "summary.json").read_text()) or {}
    except (OSError, ValueError):
        return {}


def _put(row: dict[str, Any], key: str, s) -> None:
    row[key], row[key + "_std"], row[key + "_min"], row[key + "_max"] = s.mean, s.std, s.low, s.high


def _put_diff(row: dict[str, Any], key: str, d: Difference | None) -> None:
    nan = math.nan
    row[key], row[key + "_std"], row[key + "_low"], row[key + "_high"] = (
        (d.estimate, d.std, d.low, d.high) if d is not None else (nan, nan, nan, nan)
    )
    row[key + "_seeds"] = d.n if d is not None else 0


def summarize(
    groups: Mapping[str, Mapping[int, Path]],
    target: float,
    reference: str = REFERENCE,
    resamples: int = RESAMPLES,
    majority: float | None = None,
) -> list[dict[str, Any]]:
    """One row per method of ``groups`` (method label -> seed -> finished run directory), in order.

    Every number over seeds is a :func:`~hlora.stats.spread`; rounds to target is the mean first round at
    or above ``target`` over the seeds that reach it. Against ``reference`` (when it is a method of the
    grid; other methods only): ``seeds_diff`` is :func:`~hlora.stats.paired_seeds` of the final accuracy
    over the seeds both finished, ``boot_diff`` is :func:`~hlora.stats.paired_bootstrap` of the final-round
    accuracy over dev examples (seeds with both ``dev_predictions.json`` on the same dev labels), and
    ``resolved`` says whether its interval excludes 0 (empty when there is none). Given the dev set's
    ``majority`` share, ``mb_per_point`` is the run's MB, up and down, per point of mean final accuracy above
    it (NaN at or below it: nothing was bought).
    """
    cells = {m: {s: (Path(p), read_rows(p)) for s, p in runs.items()} for m, runs in groups.items() if runs}
    longest = max((len(rows) for runs in cells.values() for _, rows in runs.values()), default=0)
    fixed = [r for r in FIXED_ROUNDS if r <= longest]
    final = {m: {s: scored_rows(rows, "accuracy")[-1]["accuracy"] for s, (_, rows) in runs.items()}
             for m, runs in cells.items()}
    table = []
    for m, runs in cells.items():
        logs = [rows for _, rows in runs.values()]
        scored = [scored_rows(r, "accuracy") for r in logs]
        row: dict[str, Any] = {"method": m, "seeds": len(runs), "rounds": len(logs[0])}
        _put(row, "final_acc", spread(list(final[m].values())))
        _put(row, "best_acc", spread([max(x["accuracy"] for x in r) for r in scored]))
        for key, col in (("personal_accuracy", "personal_acc"), ("personal_accuracy_prior", "personal_prior_acc")):
            personal = [scored_rows(r, key) for r in logs]
            # over every seed or none: a mean over the seeds that happen to have it would pass for all of them
            _put(row, col, spread([p[-1][key] if p and all(personal) else math.nan for p in personal]))
        row["personal_majority"] = spread([_summary(path).get("personal_majority", math.nan)
                                           for path, _ in runs.values()]).mean
        f1 = spread([r[-1].get("f1", math.nan) for r in scored])
        row["final_f1"], row["final_f1_std"] = f1.mean, f1.std
        for k in fixed:
            at = spread([next((x["accuracy"] for x in r if x["round"] == k), math.nan) for r in scored])
            row[f"acc_r{k}"], row[f"acc_r{k}_std"] = at.mean, at.std
        reached = [next((x["round"] for x in r if x["accuracy"] >= target), None) for r in scored]
        hit = [x for x in reached if x is not None]
        row["rounds_to_target"] = statistics.fmean(hit) if hit else math.nan
        row["reached_target"] = f"{len(hit)}/{len(scored)}"
        row.update(detection(logs))
        row["mb_up"] = statistics.fmean(sum(x["uplink_bytes"] for x in r) / 1e6 for r in logs)
        row["mb_down"] = statistics.fmean(sum(x["downlink_bytes"] for x in r) / 1e6 for r in logs)
        row["s_per_round"] = statistics.fmean(statistics.fmean(x["seconds"] for x in r) for r in logs)
        gain = 100 * (row["final_acc"] - majority) if majority is not None else math.nan
        row["mb_per_point"] = (row["mb_up"] + row["mb_down"]) / gain if gain > 0 else math.nan
        seeds_diff = boot = None
        if reference in cells and m != reference:
            both = sorted(set(runs) & set(cells[reference]))
            if both:
                seeds_diff = paired_seeds([final[m][s] for s in both], [final[reference][s] for s in both])
            pairs = []
            for s in both:
                a = _final_correct(*runs[s])
                b = _final_correct(*cells[reference][s])
                same_dev = a is not None and b is not None and (
                    read_predictions(runs[s][0])["gold"] == read_predictions(cells[reference][s][0])["gold"]
                )
                if same_dev:
                    pairs.append((a, b))
            if pairs:
                boot = paired_bootstrap([a for a, _ in pairs], [b for _, b in pairs], resamples=resamples)
        row["vs"] = reference if reference in cells and m != reference else ""
        _put_diff(row, "seeds_diff", seeds_diff)
        _put_diff(row, "boot_diff", boot)
        row["resolved"] = "" if boot is None else ("yes" if boot.resolved else "no")
        row["code"] = ",".join(code_version(path) for path, _ in runs.values())
        table.append(row)
    return table


def code_version(cell: Path) -> str:
    """The commit (7 hex digits, ``-dirty`` kept) a finished cell ran on, from its summary's provenance; the
    hlora version when it ran from a wheel; ``?`` for a cell from before provenance was recorded. A cell
    resumed on other code: each part's, joined by ``+``."""
    seen = _summary(cell).get("provenance") or {}

    def short(label: str) -> str:  # a commit to 7 hex digits, "-dirty" kept; "?" and versions as they are
        head, sep, rest = label.partition("-")
        return head[:7] + sep + rest if head and all(c in "0123456789abcdef" for c in head) else label

    # a run resumed on other code: every part's, in order
    return "+".join(short(label) for label in [*seen.get("resumed_from", []), code_label(seen)])


def code_line(table: list[dict[str, Any]]) -> str:
    """The legend line that says which code the cells ran on, with how many cells each."""
    counts = Counter(v for r in table for v in r["code"].split(","))
    ranked = sorted(counts.items(), key=lambda x: -x[1])
    parts = [f"{'not recorded' if v == '?' else v} ({n})" for v, n in ranked]
    return "- code (summary.json's provenance), cells: " + ", ".join(parts) + "."


def detection(logs: list[list[dict[str, Any]]]) -> dict[str, int]:
    """An ``--attack`` cell's rejections summed over rounds and seeds: the attackers sampled and those
    rejected (true rejections), the honest clients sampled and those rejected (false rejections); all -1
    for a cell without an attack."""
    attacked = [r for rows in logs for r in rows if "attackers" in r]
    if not attacked:
        return dict.fromkeys(("attackers_sampled", "attackers_rejected", "honest_sampled", "honest_rejected"), -1)
    attackers = sum(len(r["attackers"]) for r in attacked)
    return {"attackers_sampled": attackers,
            "attackers_rejected": sum(len(r["true_rejections"]) for r in attacked),
            "honest_sampled": sum(len(r["clients"]) for r in attacked) - attackers,
            "honest_rejected": sum(len(r["false_rejections"]) for r in attacked)}


def _share(part: int, whole: int) -> str:
    return "-" if whole < 0 else f"{part}/{whole}" + (f" ({100 * part / whole:.0f}%)" if whole else "")


def _atomic_text(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all (two ``hlora compare`` processes may write the tables at once)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _pct(mean: float, std: float) -> str:
    return "-" if math.isnan(mean) else f"{100 * mean:.1f} ± {100 * std:.1f}"


def _pct_range(r: dict[str, Any], key: str) -> str:
    if math.isnan(r[key]):
        return "-"
    return f"{_pct(r[key], r[key + '_std'])} ({100 * r[key + '_min']:.1f}-{100 * r[key + '_max']:.1f})"


def _diff(r: dict[str, Any], key: str, mark: bool) -> str:
    if not r["vs"] or math.isnan(r[key]):
        return "-"
    text = f"{100 * r[key]:+.1f}"
    if key == "seeds_diff" and not math.isnan(r[key + "_std"]):
        text += f" ± {100 * r[key + '_std']:.1f}"
    if math.isnan(r[key + "_low"]):
        return text + f" ({r[key + '_seeds']} seed)"
    text += f" [{100 * r[key + '_low']:+.1f}, {100 * r[key + '_high']:+.1f}]"
    if mark:
        text += " ✓" if r["resolved"] == "yes" else " ?"
    return text


def write_tables(table: list[dict[str, Any]], out: Path, target: float, reference: str = REFERENCE,
                 majority: float | None = None, name: str = TABLE) -> None:
    """``NAME.csv`` (every number, fractions) and ``NAME.md`` (percent, readable, with a legend; the MB per
    point above the ``majority`` share when given); ``name`` is ``table`` unless a second table of the same
    cells is wanted."""
    if not table:
        return
    out = Path(out)
    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=list(table[0]))
    w.writeheader()
    w.writerows(table)
    _atomic_text(out / f"{name}.csv", text.getvalue())
    has_f1 = any(not math.isnan(r["final_f1"]) for r in table)
    has_personal = any(not math.isnan(r["personal_acc"]) for r in table)
    has_prior = any(not math.isnan(r["personal_prior_acc"]) for r in table)
    has_attack = any(r["attackers_sampled"] >= 0 for r in table)
    fixed = [k for k in FIXED_ROUNDS if f"acc_r{k}" in table[0]]
    compared = any(r["vs"] for r in table)

    head = ["method", "seeds", "rounds", "final acc (%)", "best acc (%)"]
    head += ["personal acc (%)"] if has_personal else []
    head += ["personal + prior (%)"] if has_prior else []
    head += ["final F1 (%)"] if has_f1 else []
    head += [f"acc @{k}" for k in fixed]
    head += ["attackers rejected", "honest rejected"] if has_attack else []
    head += [f"rounds to {100 * target:.0f}%", "MB up", "MB down"]
    head += ["MB / pt"] if majority is not None else []
    head += ["s/round"]
    head += [f"Δ vs {reference}, seeds (pts)", f"Δ vs {reference}, bootstrap (pts)"] if compared else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        cells = [r["method"], str(r["seeds"]), str(r["rounds"]), _pct_range(r, "final_acc"),
                 _pct_range(r, "best_acc")]
        cells += [_pct_range(r, "personal_acc")] if has_personal else []
        cells += [_pct_range(r, "personal_prior_acc")] if has_prior else []
        cells += [_pct(r["final_f1"], r["final_f1_std"])] if has_f1 else []
        cells += [_pct(r[f"acc_r{k}"], r[f"acc_r{k}_std"]) for k in fixed]
        if has_attack:
            cells += [_share(r["attackers_rejected"], r["attackers_sampled"]),
                      _share(r["honest_rejected"], r["honest_sampled"])]
        rt = "-" if math.isnan(r["rounds_to_target"]) else f"{r['rounds_to_target']:.1f} ({r['reached_target']})"
        cells += [rt, f"{r['mb_up']:.1f}", f"{r['mb_down']:.1f}"]
        if majority is not None:
            cells += ["-" if math.isnan(r["mb_per_point"]) else f"{r['mb_per_point']:.1f}"]
        cells += [f"{r['s_per_round']:.1f}"]
        if compared:
            cells += [_diff(r, "seeds_diff", mark=False), _diff(r, "boot_diff", mark=True)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *legend(target, reference, fixed, compared, has_personal, has_attack, majority)]
    if has_prior:
        lines.append("- personal + prior: the same models with each client's training offset tau (log pi_k - log pi) "
                     "added to the logits (logit adjustment), i.e. predicting for the client's own label mix.")
    baseline = [r["personal_majority"] for r in table if not math.isnan(r["personal_majority"])]
    if has_personal and baseline:
        lines.append(f"- personal baseline: each client predicting its own training share's majority label scores "
                     f"{100 * statistics.fmean(baseline):.1f}% on the same held-out shares (mean over the cells "
                     "that record it): under label skew, the line a personal acc must clear.")
    lines.append(code_line(table))
    _atomic_text(out / f"{name}.md", "\n".join(lines) + "\n")


def legend(target: float, reference: str, fixed: list[int], compared: bool, personal: bool = False,
           attack: bool = False, majority: float | None = None) -> list[str]:
    """The lines under ``table.md``'s table that say what its columns mean."""
    lines = [
        "- final / best acc: dev accuracy at the last round / the best round, mean ± std over seeds (min-max).",
    ]
    if personal:
        lines.append("- personal acc: at the last round, each client's model (fedsa: its own; a global method: the "
                     "global model) on the held-out share of its own examples, over all held-out examples; mean ± "
                     "std over seeds (min-max); - where a seed's cell was run without --personal-eval.")
    if attack:
        lines.append("- attackers / honest rejected: over every round and seed of an --attack cell, the sampled "
                     "attackers the server rejected (true rejections) and the sampled honest clients it rejected "
                     "(false rejections), of those sampled; a rejection for a failed or broken update counts too, "
                     "and normclip's scaling does not (it rejects no one); - for a cell without an attack.")
    if fixed:
        lines.append(f"- acc @r: dev accuracy at round r ({', '.join(map(str, fixed))}), mean ± std over seeds.")
    lines += [
        f"- rounds to {100 * target:.0f}%: the first round at or above it, mean over the seeds that reach it "
        "(how many of them do).",
        "- MB up / down: bytes sent by the clients / the server over the whole run, mean over seeds; s/round: "
        "wall time of a round (training, aggregation, evaluation), mean over rounds and seeds.",
    ]
    if majority is not None:
        lines.append(f"- MB / pt: MB up + down per point of mean final accuracy above the dev set's majority class "
                     f"({100 * majority:.1f}%); - at or below it.")
    if compared:
        lines += [
            f"- Δ vs {reference}, seeds: final accuracy minus {reference}'s with the same seed (the same split, "
            "client ranks and client sample), mean ± std over seeds and the 95% paired t-interval.",
            f"- Δ vs {reference}, bootstrap: the same difference with a 95% paired bootstrap interval over dev "
            f"examples ({RESAMPLES} resamples of the examples within each seed, averaged over seeds; seeded). "
            "✓: the interval excludes 0 (resolved); ?: it does not (not resolved).",
        ]
    return lines
