"""`fluxc compare`: bench and eval records (compiler/records.py) as one table across engines and GPUs.

Records merge into rows by (record name, GPU): a bench record gives the speed columns, an eval record the
quality columns. The speed ratio is the baseline's ms/step over the row's (above 1: faster than the baseline);
a row measured with other settings than the baseline (resolution, steps, batch) gets no ratio and a flag
saying what differs, never a silent comparison.
"""

import csv
import io
import json

from fluxc.runtime.core.bundle import save_atomically
from fluxc.runtime.core.errors import FluxcError

SETTINGS = ("resolution", "steps", "batch")
COLUMNS = ("name", "gpu", "precision", "recipe", "resolution", "steps", "batch", "ms/step", "p10-p90",
           "x baseline", "e2e s", "peak GiB", "weights GB", "latent SQNR dB", "PSNR dB", "SSIM", "vs", "flags")


def load_records(paths: list[str]) -> list[dict]:
    """Every record in the files (a file holds one record or a list of them)."""
    records = []
    for path in paths:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise FluxcError(f"Cannot read record '{path}': {e}.", "Pass JSON files written by fluxc bench or fluxc eval.") from None
        for rec in data if isinstance(data, list) else [data]:
            if not isinstance(rec, dict) or rec.get("kind") not in ("bench", "eval") or "settings" not in rec:
                raise FluxcError(f"'{path}' holds something that is not a fluxc bench or eval record.",
                                 "Pass JSON files written by fluxc bench or fluxc eval.")
            records.append(rec)
    if not records:
        raise FluxcError("No records given.", "Pass one or more files written by fluxc bench or fluxc eval.")
    return records


def rows(records: list[dict], baseline: str | None = None) -> list[dict]:
    """One row per (name, GPU), in first-seen order, with ratios to the baseline row and settings flags."""
    merged: dict[tuple, dict] = {}
    for rec in records:
        key = (rec["name"], _gpu(rec))
        row = merged.setdefault(key, {"name": rec["name"], "gpu": _gpu(rec), "flags": []})
        row.update(precision=rec["engine"]["precision"] + ("*" if rec["engine"]["precision_mode"] == "emulated" else ""),
                   recipe=rec["engine"]["recipe"], weights_gb=rec["engine"]["weights_gb"])
        if rec["kind"] == "bench":
            row["settings"] = {k: rec["settings"][k] for k in SETTINGS}
            row["speed"] = rec["speed"]
        else:
            row["quality"], row["reference"] = rec["quality"]["mean"], rec["reference"]["name"]
            row["eval_settings"] = {k: rec["settings"][k] for k in SETTINGS if k != "batch"}
    table = list(merged.values())
    for row in table:
        row.setdefault("settings", row.get("eval_settings"))
        if "speed" in row and "eval_settings" in row:
            differ = _differences(row["eval_settings"], row["settings"])
            if differ:
                row["flags"].append("eval at " + differ)
    base = _baseline(table, baseline)
    for row in table:
        if "speed" not in row or base is None:
            continue
        differ = _differences(row["settings"], base["settings"])
        if differ:
            row["flags"].append(f"not compared with {base['name']}: {differ}")
        else:
            row["ratio"] = base["speed"]["ms_per_step"]["median"] / row["speed"]["ms_per_step"]["median"]
    return table


def _gpu(rec: dict) -> str:
    return rec["machine"]["gpu"] or "cpu"


def _baseline(table: list[dict], name: str | None) -> dict | None:
    timed = [r for r in table if "speed" in r]
    if name is None:
        return timed[0] if timed else None
    found = [r for r in timed if name in (r["name"], f"{r['name']}@{r['gpu']}")]
    if len(found) != 1:
        names = ", ".join(f"{r['name']}@{r['gpu']}" for r in timed)
        raise FluxcError(f"--baseline {name} matches {len(found)} bench records.", f"Use one of: {names}.")
    return found[0]


def _differences(a: dict, b: dict) -> str:
    return ", ".join(f"{k} {a[k]} vs {b[k]}" for k in a if k in b and a[k] != b[k])


def cells(row: dict) -> dict:
    """The row as display strings, by column."""
    s, q, st = row.get("speed"), row.get("quality"), row["settings"]
    ms = s and s["ms_per_step"]
    fmt = lambda v, f: "" if v is None else format(v, f)
    return {
        "name": row["name"], "gpu": row["gpu"], "precision": row["precision"], "recipe": row["recipe"],
        "resolution": st["resolution"], "steps": str(st["steps"]), "batch": str(st.get("batch", "")),
        "ms/step": fmt(ms and ms["median"], ".1f"), "p10-p90": f"{ms['p10']:.1f}-{ms['p90']:.1f}" if ms else "",
        "x baseline": fmt(row.get("ratio"), ".2f"), "e2e s": fmt(s and s.get("e2e_s", {}).get("total"), ".2f"),
        "peak GiB": fmt(s and s.get("peak_gpu_gib"), ".1f"), "weights GB": fmt(row.get("weights_gb"), ".2f"),
        "latent SQNR dB": fmt(q and q["latent_sqnr_db"], ".1f"), "PSNR dB": fmt(q and q["image_psnr_db"], ".1f"),
        "SSIM": fmt(q and q["ssim"], ".3f"), "vs": row.get("reference", ""), "flags": "; ".join(row["flags"]),
    }


def render(table: list[dict], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(table, indent=1) + "\n"
    lines = [cells(r) for r in table]
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, COLUMNS)
        writer.writeheader()
        writer.writerows(lines)
        return out.getvalue()
    head = "| " + " | ".join(COLUMNS) + " |"
    rule = "| " + " | ".join("---:" if c in ("ms/step", "x baseline", "e2e s", "peak GiB", "weights GB",
                                             "latent SQNR dB", "PSNR dB", "SSIM") else "---" for c in COLUMNS) + " |"
    return "\n".join([head, rule] + ["| " + " | ".join(c[k] for k in COLUMNS) + " |" for c in lines]) + "\n"


def plot(table: list[dict], path: str) -> None:
    """Latency bars (median ms/step, p10-p90 whiskers) per row, image PSNR as markers on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in table if "speed" in r]
    if not timed:
        raise FluxcError("No bench records to plot.", "Pass records written by fluxc bench.")
    labels = [f"{r['name']}\n{r['gpu']}" for r in timed]
    ms = [r["speed"]["ms_per_step"] for r in timed]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(timed)), 4.5))
    x = range(len(timed))
    ax.bar(x, [m["median"] for m in ms], color="#4c72b0",
           yerr=[[m["median"] - m["p10"] for m in ms], [m["p90"] - m["median"] for m in ms]], capsize=4)
    for i, r in enumerate(timed):
        note = f"{r['ratio']:.2f}x" if "ratio" in r else "not compared"
        ax.annotate(note, (i, ms[i]["p90"]), ha="center", va="bottom", xytext=(0, 4), textcoords="offset points")
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylim(0, 1.25 * max(m["p90"] for m in ms))  # room for the ratio labels and the legend
    ax.set_ylabel("ms per denoising step (median; p10-p90)")
    quality = [(i, r["quality"]["image_psnr_db"]) for i, r in enumerate(timed) if "quality" in r]
    if quality:
        ax2 = ax.twinx()
        ax2.plot([i for i, _ in quality], [q for _, q in quality], "D", color="#dd8452", label="image PSNR dB")
        ax2.set_ylabel("image PSNR vs reference (dB)")
        lo, hi = min(q for _, q in quality), max(q for _, q in quality)
        ax2.set_ylim(lo - 5, hi + 5)
        ax2.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    try:
        save_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120))
    finally:
        plt.close(fig)
