"""A study's numbers into its verdicts, tables, study.md and study.png.

Each variant ran once per seed; its entry holds the per-seed numbers and their mean and spread. A
finding compares two variants on a metric: the measured direction is ">" or "<" only when the gap
exceeds both REL_TOL of the larger value and two standard errors of the gap over seeds; else "≈".
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from dlip_ds.demo import format_table, machine_text
from dlip_ds.studies.plan import Study

METRICS = {"mean_recall": "mean recall", "cider": "CIDEr"}
REL_TOL = 0.03  # a gap within 3% of the larger value is no direction (single runs of small students vary that much)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def direction(a: list[float], b: list[float], rel_tol: float = REL_TOL) -> str:
    """'>', '<' or '≈' between the means of a and b; 'n/a' when either has no finite value."""
    if not a or not b or not all(math.isfinite(v) for v in a + b):
        return "n/a"
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    noise = 2 * math.sqrt(sa * sa / len(a) + sb * sb / len(b))  # two standard errors of the gap
    if abs(ma - mb) <= max(rel_tol * max(abs(ma), abs(mb)), noise):
        return "≈"
    return ">" if ma > mb else "<"


def summarise(study: Study, results: dict[str, list[dict]]) -> dict[str, dict]:
    """{variant: {label, params, runs, mean: {metric: x}, std: {metric: x}}} in the study's order."""
    out = {}
    for v in study.variants:
        runs = results[v.name]
        keys = ("mean_recall", "cider", "step_s")
        stats = {k: mean_std([r[k] for r in runs if r.get(k) is not None]) for k in keys}
        out[v.name] = {"label": v.label, "overrides": study.overrides(v), "params": runs[0]["params"], "runs": runs,
                       "mean": {k: s[0] for k, s in stats.items()}, "std": {k: s[1] for k, s in stats.items()}}
    return out


def judge(study: Study, variants: dict[str, dict]) -> list[dict]:
    """One entry per finding and metric: the paper's direction, the measured one, whether they agree."""
    out = []
    for f in study.findings:
        for metric in f.metrics:
            a = [r[metric] for r in variants[f.a]["runs"]]
            b = [r[metric] for r in variants[f.b]["runs"]]
            measured = direction(a, b)
            out.append({"claim": f.claim, "metric": metric, "a": f.a, "b": f.b, "expected": f.relation,
                        "measured": measured, "a_mean": mean_std(a)[0], "b_mean": mean_std(b)[0],
                        "reproduced": measured == f.relation})
    return out


def costs(study: Study, variants: dict[str, dict]) -> list[dict]:
    """Training time per step of a against b (study.costs), from the runs' time/* scalars."""
    out = []
    for a, b in study.costs:
        ta, tb = variants[a]["mean"]["step_s"], variants[b]["mean"]["step_s"]
        out.append({"a": a, "b": b, "a_step_s": ta, "b_step_s": tb,
                    "ratio": ta / tb if tb and math.isfinite(tb) else float("nan")})
    return out


# ----------------------------------------------------------------------------- text


def _pm(mean: float, std: float, n: int, digits: int = 2) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def variant_rows(report: dict) -> list[list[str]]:
    rows = [["variant", "changes", "params", "mean recall", "CIDEr", "s/step"]]
    for name, v in report["variants"].items():
        n = len(v["runs"])
        rows.append([name, v["label"], _count(v["params"]), _pm(v["mean"]["mean_recall"], v["std"]["mean_recall"], n),
                     _pm(v["mean"]["cider"], v["std"]["cider"], n), _pm(v["mean"]["step_s"], v["std"]["step_s"], n, 3)])
    return rows


def measured_text(f: dict) -> str:
    """e.g. 'vision-half 41.20 vs text-half 40.80 (≈)'."""
    return f"{f['a']} {f['a_mean']:.2f} vs {f['b']} {f['b_mean']:.2f} ({f['measured']})"


def finding_rows(report: dict) -> list[list[str]]:
    rows = [["finding (paper)", "metric", "paper", "measured", "reproduced"]]
    for f in report["findings"]:
        rows.append([f["claim"], METRICS[f["metric"]], f"{f['a']} {f['expected']} {f['b']}", measured_text(f),
                     "yes" if f["reproduced"] else "no"])
    return rows


def verdict(report: dict) -> str:
    """Plainly: which of the paper's directions this run reproduced."""
    found = report["findings"]
    yes = [f for f in found if f["reproduced"]]
    parts = [f"{f['claim']} ({METRICS[f['metric']]}: {'reproduced' if f['reproduced'] else 'NOT reproduced'}, "
             f"{measured_text(f)})" for f in found]
    return (f"The paper's direction reproduced in {len(yes)} of {len(found)} comparisons: " + "; ".join(parts) + ".")


def cost_text(report: dict) -> str:
    if not report["costs"]:
        return ""
    parts = [f"{c['a']} {c['a_step_s']:.3f} s/step vs {c['b']} {c['b_step_s']:.3f} ({100 * (c['ratio'] - 1):+.0f}%)"
             for c in report["costs"]]
    return "Cost (training time per step, median of the logged steps): " + "; ".join(parts) + "."


def _md_table(rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])] + ["| " + " | ".join(r) + " |"
                                                                              for r in rows[1:]]


def write_markdown(report: dict, path: Path) -> None:
    m = report["machine"]
    where = (f"{report['date']}, {report['scale_name']} scale, {report['steps']} steps per run, "
             f"{len(report['seeds'])} seed(s) per variant ({', '.join(map(str, report['seeds']))}), "
             f"{machine_text(m)}, {report['elapsed_s'] / 60:.1f} minutes this call.")
    setup = (f"Student: {report['student']}. Teacher: the demo's pretrained teacher ({report['teacher']}, "
             f"{_count(report['teacher_params'])} parameters). Every variant is `dlip-ds train --config demo-distill` "
             "with the overrides in study.json, scored by `dlip-ds evaluate` on the demo's held-out pairs "
             f"({report['eval']['images']} images): mean recall (R@1/5/10 both ways, ITC top-{report['eval']['k']} "
             "re-ranked by ITM) and CIDEr (beam 3).")
    rule = (f"Measured direction: '>' or '<' when the gap exceeds both {100 * REL_TOL:.0f}% of the larger value and "
            "two standard errors of the gap over seeds, else '≈'. Nothing here is tuned to agree with the paper.")
    md = [f"# Study `{report['study']}`: {report['title']}", "", where, "", setup, ""]
    md += _md_table(variant_rows(report)) + [""] + _md_table(finding_rows(report))
    md += ["", verdict(report), ""]
    for extra in (cost_text(report), report.get("notes", ""), rule):
        if extra:
            md += [extra, ""]
    md += ["![the study](study.png)", ""]
    path.write_text("\n".join(md))


def console_text(report: dict) -> str:
    text = format_table(variant_rows(report)) + "\n\n" + format_table(finding_rows(report)) + "\n\n" + verdict(report)
    return text + ("\n" + cost_text(report) if report["costs"] else "")


def plot(report: dict, path: Path) -> Path:
    """Bars per variant: mean recall, CIDEr and time per step, seed spread as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["variants"])
    fig, axes = plt.subplots(1, 3, figsize=(4 + 1.6 * len(names), 4))
    for ax, key, label in zip(axes, ("mean_recall", "cider", "step_s"), ("mean recall (%)", "CIDEr", "s / step")):
        means = [report["variants"][n]["mean"][key] for n in names]
        stds = [report["variants"][n]["std"][key] for n in names]
        ax.bar(range(len(names)), means, yerr=stds, capsize=4, color="tab:blue" if key != "step_s" else "tab:gray")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_title(label)
    fig.suptitle(f"study {report['study']}: {report['title']} ({report['scale_name']}, {len(report['seeds'])} seed(s))")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
