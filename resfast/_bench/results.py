"""Result files: one JSON (metadata + rows) and one CSV (the rows) per run, a PNG plot beside them, and the
regression comparison of two JSON files."""

from __future__ import annotations

import csv
import datetime
import json
import re
from pathlib import Path
from typing import Optional

# fields that identify a measurement (the rest are measured values)
KEY_FIELDS = ("kind", "model", "op", "layer", "stage", "shape", "provider", "mode", "batch", "size", "dtype")
METRIC = "median_ms"


def default_stem(kind: str, device: str) -> str:
    dev = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")[:40]
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{kind}_{dev}_{stamp}"


def write_result(result: dict, out_dir: Path, stem: Optional[str] = None, plot: bool = True) -> list[Path]:
    """Write RESULT.json, RESULT.csv and (if matplotlib is installed) RESULT.png; return the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or default_stem(result["kind"], result["device"])
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.csv"]
    paths[0].write_text(json.dumps(result, indent=1) + "\n")
    rows = result["rows"]
    fields = sorted({k for r in rows for k in r}, key=lambda k: (k not in KEY_FIELDS, k))
    with paths[1].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in fields})
    if plot:
        png = out_dir / f"{stem}.png"
        if plot_result(result, png):
            paths.append(png)
    return paths


def load(path) -> dict:
    r = json.loads(Path(path).read_text())
    if "rows" not in r or not isinstance(r["rows"], list):
        raise ValueError(f"{path}: not a resfast benchmark result (no 'rows' list)")
    return r


def row_key(row: dict, kind: str = "") -> tuple:
    return tuple((k, str(row.get(k, kind if k == "kind" else ""))) for k in KEY_FIELDS)


def compare(old: dict, new: dict, threshold: float = 0.05) -> dict:
    """Rows of `new` slower than in `old` by more than `threshold` (relative median), faster ones, and rows
    present in only one file. Skipped rows (no median) are not compared."""
    ko, kn = old.get("kind", ""), new.get("kind", "")
    a = {row_key(r, ko): r for r in old["rows"] if r.get(METRIC) is not None}
    b = {row_key(r, kn): r for r in new["rows"] if r.get(METRIC) is not None}
    slower, faster = [], []
    for k in a.keys() & b.keys():
        ratio = b[k][METRIC] / a[k][METRIC]
        entry = {"key": dict(k), "old_ms": a[k][METRIC], "new_ms": b[k][METRIC], "ratio": ratio}
        if ratio > 1 + threshold:
            slower.append(entry)
        elif ratio < 1 - threshold:
            faster.append(entry)
    slower.sort(key=lambda e: -e["ratio"])
    faster.sort(key=lambda e: e["ratio"])
    return {"slower": slower, "faster": faster, "only_old": [dict(k) for k in a.keys() - b.keys()],
            "only_new": [dict(k) for k in b.keys() - a.keys()], "threshold": threshold,
            "devices": (old.get("device"), new.get("device"))}


def format_compare(c: dict) -> str:
    def name(key):
        return " ".join(f"{k}={v}" for k, v in key.items() if v not in ("", "None"))

    lines = []
    if c["devices"][0] != c["devices"][1]:
        lines.append(f"warning: different devices: {c['devices'][0]!r} vs {c['devices'][1]!r}")
    lines.append(f"{len(c['slower'])} slower, {len(c['faster'])} faster (threshold {c['threshold']:.0%}), "
                 f"{len(c['only_old'])} only in OLD, {len(c['only_new'])} only in NEW")
    for e in c["slower"]:
        lines.append(f"  SLOWER {e['ratio']:.2f}x  {e['old_ms']:.3f} -> {e['new_ms']:.3f} ms  {name(e['key'])}")
    for e in c["faster"]:
        lines.append(f"  faster {e['ratio']:.2f}x  {e['old_ms']:.3f} -> {e['new_ms']:.3f} ms  {name(e['key'])}")
    return "\n".join(lines)


def plot_result(result: dict, png: Path) -> bool:
    """images/s per model and provider (models), or speedup over eager channels_last per layer (ops, one
    horizontal bar group a layer). False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in result["rows"] if r.get(METRIC) is not None]
    if not rows:
        return False
    models = result["kind"] == "models"
    fields = ("model", "mode") if models else ("layer", "mode", "batch", "dtype")
    value, label = ("images_per_s", "images/s") if models else ("speedup_vs_eager", "speedup vs eager channels_last")
    groups = list(dict.fromkeys(tuple(r[k] for k in fields) for r in rows))
    providers = sorted({r["provider"] for r in rows})
    lookup = {(tuple(r[k] for k in fields), r["provider"]): r.get(value) or 0 for r in rows}
    width = 0.8 / len(providers)
    title = f"{result['kind']}: {result['device']} | torch {result['versions']['torch']}"
    if models:
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups)), 4.5))
        for i, p in enumerate(providers):
            ax.bar([j + i * width for j in range(len(groups))], [lookup.get((g, p), 0) for g in groups], width,
                   label=p)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
        ax.set_xticklabels(["\n".join(map(str, g)) for g in groups], fontsize=7)
        ax.set_ylabel(label)
    else:
        fig, ax = plt.subplots(figsize=(10, 1.5 + 0.22 * len(groups) * max(1, len(providers) / 2)))
        for i, p in enumerate(providers):
            ax.barh([j + i * width for j in range(len(groups))], [lookup.get((g, p), 0) for g in groups], width,
                    label=p)
        ax.set_yticks([j + 0.4 - width / 2 for j in range(len(groups))])
        ax.set_yticklabels([" ".join(map(str, g)) for g in groups], fontsize=6)
        ax.invert_yaxis()
        ax.axvline(1.0, color="k", lw=0.6)
        ax.set_xlabel(label)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True
