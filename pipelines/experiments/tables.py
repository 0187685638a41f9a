"""Markdown tables of an experiment's ``results.json``, as its results page shows them.

``prism experiment table DIR`` prints them, so a page's numbers are copied from one command's
output rather than typed: what each arm's run recorded (equal-compute experiments), the rows
(each model's metrics, with the training it had), the real-vs-real floor of every metric at
the rows' sample size beneath them, the points along each arm's run, the paired bootstrap
differences with their 95% intervals, and the verdict with its rule. Metrics are lower-better
except precision and recall; ``slope_diff`` is best at 0, ``hf_outliers`` at its floor.
"""

from __future__ import annotations

from typing import Any

# summary-row columns in the order a page shows them (FD-prism carries its network's hash)
METRICS = ("FD-prism", "kid_prism_x1e3", "precision", "recall", "swd_x1e3", "log_rapsd_l1",
           "slope_diff", "hf_outliers")
PROGRESS = (("images_seen", "images seen"), ("train_seconds", "training s"),
            ("train_flops", "training FLOPs"))


def fmt(value: Any) -> str:
    """A cell: 4 significant digits, counts below 1e9 with separators, FLOP-sized numbers in
    3 significant digits, '-' where absent."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if abs(value) >= 1e9:
        return f"{value:.3g}"
    if isinstance(value, int) or float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:.4g}"


def _metric_columns(rows: list[dict[str, Any]]) -> list[str]:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return [k for m in METRICS for k in keys
            if k == m or (m == "FD-prism" and k.startswith("FD-prism") and not k.endswith("_se"))]


def _label(row: dict[str, Any]) -> str:
    return str(row.get("tag") or row.get("method") or row.get("name") or "?")


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(cells) + " |" for cells in body]]


def rows_table(results: dict[str, Any]) -> list[str]:
    """One line per summary row, then the floor at each of the rows' sample sizes."""
    rows = results.get("rows") or []
    if not rows:
        return []
    metrics = _metric_columns(rows)
    progress = [(k, name) for k, name in PROGRESS if any(r.get(k) is not None for r in rows)]
    seconds = any("sample_seconds_per_image" in r for r in rows)
    header = ["row", "n", *[name for _, name in progress], *metrics,
              *(["sampling s/image"] if seconds else [])]
    body = [[_label(r), fmt(r.get("n")), *[fmt(r.get(k)) for k, _ in progress],
             *[fmt(r.get(m)) for m in metrics],
             *([fmt(r.get("sample_seconds_per_image"))] if seconds else [])] for r in rows]
    floors = results.get("floors") or {}
    for n in sorted({r.get("n") for r in rows if r.get("n") is not None}):
        floor = floors.get(str(n))
        if floor is None:
            continue
        body.append([f"floor: real vs real ({floor.get('what', '')})", fmt(floor.get("n")),
                     *["" for _ in progress], *[fmt(floor.get(m)) for m in metrics],
                     *([""] if seconds else [])])
    return _table(header, body)


ARM_COLUMNS = (("device", "chip"), ("parameters", "parameters"),
               ("flops_per_image", "GFLOP/image"), ("train_seconds", "training s"),
               ("images_seen", "images seen"), ("train_flops", "training FLOPs"),
               ("images_per_second", "images/s (loop's clock)"),
               ("images_per_second_median", "median window images/s"),
               ("first_step_s", "first step s"), ("peak_memory_gib", "peak GiB"))


def arms_table(results: dict[str, Any]) -> list[str]:
    """What each arm's run recorded (equal-compute experiments: ``references[arm].budget``):
    the chip, parameters, measured FLOPs per image, training seconds, images and FLOPs,
    rates, compilation and peak memory."""
    refs = {a: r["budget"] for a, r in (results.get("references") or {}).items()
            if isinstance(r, dict) and isinstance(r.get("budget"), dict)}
    if not refs:
        return []

    def cell(b: dict[str, Any], key: str) -> str:
        if key == "flops_per_image":
            return fmt(None if b.get(key) is None else b[key] / 1e9)
        if key == "images_per_second":
            ok = b.get("images_seen") and b.get("train_seconds")
            return fmt(b["images_seen"] / b["train_seconds"] if ok else None)
        if key == "first_step_s":
            return fmt(b[key][0] if b.get(key) else None)
        return fmt(b.get(key))

    return _table(["arm", *[name for _, name in ARM_COLUMNS]],
                  [[a, *[cell(b, k) for k, _ in ARM_COLUMNS]] for a, b in refs.items()])


def curves_table(results: dict[str, Any]) -> list[str]:
    """Every arm's snapshots along its run (``curves``): training progress and metrics."""
    curves = results.get("curves") or {}
    points = [p for pts in curves.values() for p in pts]
    if not points:
        return []
    metrics = _metric_columns(points)
    return _table(["point", *[name for _, name in PROGRESS], *metrics],
                  [[_label(p), *[fmt(p.get(k)) for k, _ in PROGRESS],
                    *[fmt(p.get(m)) for m in metrics]] for p in points])


def comparisons_table(results: dict[str, Any]) -> list[str]:
    """Each paired comparison (``b - a``, or its setting where the experiment names the pair
    by it, e.g. S1's sampler and steps): difference [95% interval] per metric."""
    comps = results.get("comparisons") or []
    if not comps:
        return []
    metrics = [k for m in METRICS for k in dict.fromkeys(k for c in comps for k in c)
               if isinstance(next((c[k] for c in comps if k in c), None), dict)
               and (k == m or (m == "FD-prism" and k.startswith("FD-prism")))]
    budgets = any("budget" in c for c in comps)
    body = []
    for c in comps:
        setting = ", ".join(f"{k}={v}" for k, v in c.items()
                            if k not in ("a", "b", "budget") and not isinstance(v, dict))
        label = f"{c['b']} - {c['a']}" if "a" in c and "b" in c else setting
        cells = [("-" if c.get(m) is None else f"{fmt(c[m]['difference'])} "
                  f"[{fmt(c[m]['lo'])}, {fmt(c[m]['hi'])}]") for m in metrics]
        body.append([label, *([str(c.get("budget", ""))] if budgets else []), *cells])
    return _table(["difference", *(["budget"] if budgets else []), *metrics], body)


def results_markdown(results: dict[str, Any]) -> str:
    """The experiment's tables and verdict as markdown (an empty section is left out)."""
    env = results.get("environment") or {}
    lines = [f"{results.get('experiment', '?')} ({results.get('setting', '?')}): "
             f"{env.get('date', '?')}, {env.get('device', '?')}, commit "
             f"{env.get('commit', '?')}{' (dirty)' if env.get('dirty') else ''}", ""]
    for section in (arms_table(results), rows_table(results), curves_table(results),
                    comparisons_table(results)):
        if section:
            lines += [*section, ""]
    v = results.get("verdict") or {}
    if v:
        lines.append(f"Verdict: **{v.get('verdict')}**"
                     + (f" ({v['reason']})" if v.get("reason") else "")
                     + (f". Rule: {v['rule']}" if v.get("rule") else ""))
    return "\n".join(lines).rstrip() + "\n"
