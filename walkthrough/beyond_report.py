"""
The reporting of walkthrough/beyond.py: each miniature's table in the paper's layout with the paper's numbers quoted
beside it, zero-init's per-seed wins against every other method, and the SVG figure of the gates per layer and head.
Reads the results study_task returns; trains nothing.
"""
from xml.sax.saxutils import escape

from walkthrough.beyond_models import GATE_VARIANTS, MAIN_METHODS

LABELS = {"linear_probe": "linear probe", "full_finetune": "full fine-tuning", "ungated": "ungated prompts",
          "zero_init": "zero-init gated prompts (the paper)", "random_gate": "random-init gate",
          "gate_one": "gate fixed at 1", "linear_gate": "gate without tanh (0 at 0)", "zero_shot": "zero-shot",
          "random_probe": "linear probe on a randomly initialised encoder"}


def fmt(v, digits=1):
    return "-" if v is None else f"{100 * v:.{digits}f}"


def mean_range(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None, None
    return sum(values) / len(values), min(values), max(values)


def cell(runs, metric):
    mean, lo, hi = mean_range([r["test"][metric] for r in runs])
    if mean is None:
        return "n/a"
    return fmt(mean) if len(runs) == 1 else f"{fmt(mean)} ({fmt(lo)}-{fmt(hi)})"


def compare(a_runs, b_runs, metric):
    """Zero-init (a) against another method (b) on one metric: per-seed wins, and the verdict: better or worse
    when the gap between the means is larger than both seed ranges, a tie inside them."""
    a = [r["test"][metric] for r in a_runs]
    b = [r["test"][metric] for r in b_runs]
    if None in a or None in b:
        return None
    wins = sum(x > y for x, y in zip(a, b))
    gap = sum(a) / len(a) - sum(b) / len(b)
    spread = max(max(a) - min(a), max(b) - min(b))
    verdict = "tie" if abs(gap) <= spread else ("better" if gap > 0 else "worse")
    return {"wins": wins, "of": min(len(a), len(b)), "gap": gap, "verdict": verdict}


# The paper's numbers, quoted (arXiv 2303.16199 v3), beside the rows they correspond to
PAPER = {
    "vision": {"columns": ["natural", "specialized", "structured", "mean"],
               "rows": {"full_finetune": [75.88, 83.36, 47.64, 68.96], "ungated": [78.48, 82.43, 54.98, 71.96],
                        "zero_init": [81.74, 84.43, 56.75, 74.31]},
               "note": "ViT-B/16 (ImageNet-21k) on VTAB-1k's 19 tasks, group means; the full and VPT rows are the "
                       "VPT paper's; no linear probe; zero-init beats VPT on 16 of 19 tasks"},
    "text": {"columns": ["SQuAD 1.1 EM/F1", "SQuAD 2.0 EM/F1", "CoNLL03 F1"],
             "rows": {"full_finetune": ["88.9/94.6", "86.5/89.4", "92.6"], "ungated": ["88.5/94.4", "82.1/85.5", "91.8"],
                      "zero_init": ["88.8/94.6", "83.9/87.2", "92.4"]},
             "note": "RoBERTa-large; the ungated row is P-tuning v2"},
    "clip": {"columns": ["HM"],
             "rows": {"zero_shot": ["80.15"], "zero_init": ["84.67"]},
             "note": "CLIP ViT-B/16, base-to-novel on ImageNet, Caltech101, Flowers102; also CoOp 79.90, CoCoOp "
                     "83.55, MaPLe 84.02 (HM); zero-init's novel 80.07 against zero-shot's 79.98"},
}


def miniature_table(miniature, tasks, results, cfg, s):
    """Markdown lines: the paper's layout, this miniature's numbers (test, mean (range) over seeds), the paper's
    quoted beside; then per-seed wins of zero-init against each other method; then the gate variants."""
    paper = PAPER[miniature]
    rows = (["zero_shot"] if miniature == "clip" else []) + MAIN_METHODS + ["random_probe"]
    columns = [(t, m) for t in tasks for m in t.metrics]
    if miniature == "clip":
        head = ["method"] + [m for _, m in columns]
    else:
        head = ["method"] + [{"qa": "QA", "tagging": "tagging entity"}.get(t.name, t.name) + f" {m}"
                             if miniature == "text" else f"{t.name} ({t.group})" for t, m in columns]
        if miniature == "vision":
            head.append("mean")
    head += [f"trainable ({tasks[0].name})" if len(tasks) > 1 else "trainable"] + [f"paper: {c}" for c in paper["columns"]]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for method in rows:
        if not all(method in results[t.name] for t in tasks):
            continue
        cells = [LABELS[method] + (f" (lr {results[tasks[0].name][method]['lr']:g})" if len(tasks) == 1
                                   and method != "zero_shot" else "")]
        cells += [cell(results[t.name][method]["runs"], m) for t, m in columns]
        if miniature == "vision":
            means = [mean_range([r["test"]["accuracy"] for r in results[t.name][method]["runs"]])[0] for t in tasks]
            cells.append(fmt(sum(means) / len(means)))
        cells.append(f"{results[tasks[0].name][method]['runs'][0]['trainable']:,}")
        cells += [str(v) for v in paper["rows"].get(method, [""] * len(paper["columns"]))]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Test set, mean (min-max) over {s['seeds']} seeds; the paper's columns are quoted, not reproduced "
                 f"({paper['note']})." + chance(miniature, tasks) + " Learning rates (chosen on the validation split): " + "; ".join(
                     f"{t.name}: " + ", ".join(f"{LABELS[m].split(' (')[0]} {results[t.name][m]['lr']:g}"
                                               for m in rows if m in results[t.name] and m != "zero_shot")
                     for t in tasks) + ".")
    lines.append("")
    lines += wins_lines(tasks, results, [m for m in rows if m not in ("zero_init", "random_probe")])
    variant_task = next(t for t in tasks if t.name == cfg["variant_task"])
    vr = results[variant_task.name]
    if all(m in vr for m in GATE_VARIANTS):
        lines += ["", f"The gate variants on {variant_task.name} (same K, L, budget; each its own learning rate):", ""]
        vhead = ["gate"] + variant_task.metrics + ["trainable", "lr"]
        lines += ["| " + " | ".join(vhead) + " |", "|---|" + "---:|" * (len(vhead) - 1)]
        for m in GATE_VARIANTS:
            lines.append("| " + " | ".join([LABELS[m]] + [cell(vr[m]["runs"], k) for k in variant_task.metrics] +
                                           [f"{vr[m]['runs'][0]['trainable']:,}", f"{vr[m]['lr']:g}"]) + " |")
        lines.append("")
        lines += wins_lines([variant_task], results, GATE_VARIANTS[1:])
    return lines


def chance(miniature, tasks):
    if miniature == "vision":
        return " Chance: " + ", ".join(f"{t.name} {100 / t.n_classes:.1f}%" for t in tasks) + "."
    if miniature == "clip":
        return f" Chance: {100 / len(tasks[0].class_names['base']):.0f}% on either half."
    return ""


def wins_lines(tasks, results, others):
    lines = []
    for other in others:
        parts = []
        for t in tasks:
            if other not in results[t.name] or "zero_init" not in results[t.name]:
                continue
            for m in t.metrics:
                c = compare(results[t.name]["zero_init"]["runs"], results[t.name][other]["runs"], m)
                if c is not None:
                    parts.append(f"{t.name} {m}: {c['verdict']} ({c['gap'] * 100:+.1f}; ahead in {c['wins']} of "
                                 f"{c['of']} seeds)")
        if parts:
            lines.append(f"- zero-init against {LABELS[other]}: " + "; ".join(parts))
    return lines


# ----------------------------------------------------------------------------------------------------------
# The figure: zero-init's scale(gate) per layer and head after adaptation, mean over seeds, one grid per task


def svg_figure(rows, title):
    """rows: one list of panels per miniature, each panel (heading, [[value per head] per layer, lowest adapted layer
    first], note, number of the lowest adapted layer). One self-contained SVG; cells of class "gate-cell", blue for
    positive values, red for negative, each value written inside."""
    cell_w, cell_h, gap, label_w = 44, 28, 24, 52
    panel_w = [[max(len(p[1][0]) * cell_w, 140) + label_w for p in row] for row in rows]
    row_h = [64 + max(len(p[1]) for p in row) * cell_h + 24 for row in rows]
    width = max(sum(w) + gap * (len(w) + 1) for w in panel_w)
    height = 30 + sum(row_h) + 30
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} '
             f'{height}" font-family="sans-serif" font-size="11">', f'<rect width="{width}" height="{height}" '
             f'fill="white"/>', f'<text x="{gap}" y="20" font-size="14">{escape(title)}</text>']
    top = 30
    for row, widths, h in zip(rows, panel_w, row_h):
        x, grid_top = gap, top + 40
        for (heading, grid, note, first_layer), w in zip(row, widths):
            left = x + label_w  # the grid's left edge; the layer labels stand before it
            middle = left + len(grid[0]) * cell_w / 2
            parts.append(f'<text x="{middle}" y="{grid_top - 22}" text-anchor="middle" font-size="12">'
                         f'{escape(heading)}</text>')
            parts.append(f'<text x="{middle}" y="{grid_top - 8}" text-anchor="middle" fill="#555">{escape(note)}</text>')
            for r, values in enumerate(reversed(grid)):  # the top layer drawn first, at the top
                y = grid_top + r * cell_h
                parts.append(f'<text x="{left - 5}" y="{y + cell_h / 2 + 4}" text-anchor="end">layer '
                             f'{first_layer + len(grid) - 1 - r}</text>')
                for head, v in enumerate(values):
                    strength = min(1.0, abs(v))
                    shade = round(255 * (1 - 0.85 * strength))
                    color = f"rgb({shade},{shade},255)" if v >= 0 else f"rgb(255,{shade},{shade})"
                    cx = left + head * cell_w
                    parts.append(f'<rect class="gate-cell" x="{cx}" y="{y}" width="{cell_w - 2}" '
                                 f'height="{cell_h - 2}" fill="{color}" stroke="#999"/>')
                    parts.append(f'<text x="{cx + cell_w / 2 - 1}" y="{y + cell_h / 2 + 4}" text-anchor="middle" '
                                 f'fill="{"white" if strength > 0.6 else "black"}">{v:+.2f}</text>')
            parts.append(f'<text x="{middle}" y="{grid_top + len(grid) * cell_h + 12}" text-anchor="middle">heads 1 '
                         f'to {len(grid[0])}</text>')
            x += w + gap
        top += h
    parts.append(f'<text x="{gap}" y="{height - 10}" fill="#555">Each cell: scale(gate) of one head after adaptation, '
                 f'the mean over seeds (tanh(gate); the gate itself for "gate without tanh"); blue positive, red '
                 f'negative. Every gate started at 0 but random-init\'s.</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def gate_panels(miniature, tasks, results, cfg):
    panels = []
    for t in tasks:
        variants = ["zero_init"] + ([m for m in ("random_gate", "linear_gate") if m in results[t.name]]
                                    if t.name == cfg["variant_task"] else [])
        for m in variants:
            grids = [r["gates"] for r in results[t.name][m]["runs"] if r["gates"]]
            mean = [[sum(g[l][h] for g in grids) / len(grids) for h in range(len(grids[0][0]))]
                    for l in range(len(grids[0]))]
            panels.append((f"{miniature}: {t.name}", mean, LABELS[m].split(" (")[0],
                           cfg["n_layers"] - cfg["L"] + 1))
    return panels
