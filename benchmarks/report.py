"""The benchmark's outputs: one JSON document (machine, options, workloads, every cell), a markdown report
(a summary, then one table per case and mode) and a PNG of useful throughput per peer."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

MODE_NAMES = {"fwd": "forward", "fwdbwd": "forward+backward"}


def output_paths(out_dir: Path, slug: str, date: str, device_kind: str, quick: bool, dtype_tag: str = "") -> dict:
    """``<slug>-<YYYYMMDD>[-<dtype>][-quick].{json,md,png}``; full runs also refresh ``latest-<cpu|cuda>[-<dtype>].md``.
    ``dtype_tag`` names a dtype other than the device's default, so a bf16 CPU run never overwrites the fp32 one."""
    tag = f"-{dtype_tag}" if dtype_tag else ""
    stem = f"{slug}-{date}{tag}" + ("-quick" if quick else "")
    paths = {ext: out_dir / f"{stem}.{ext}" for ext in ("json", "md", "png")}
    if not quick:
        paths["latest"] = out_dir / f"latest-{device_kind}{tag}.md"
    return paths


def write_json(doc: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=_jsonable, allow_nan=False))
    tmp.replace(path)


def _jsonable(x):
    return str(x)


def clean_floats(obj):
    """NaN/inf are not JSON: they become strings ("nan", "inf")."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: clean_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clean_floats(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------- markdown


def _unit(doc: dict) -> tuple[str, float]:
    return ("TFLOP/s", 1.0) if doc["machine"]["device_kind"] == "cuda" else ("GFLOP/s", 1e3)


def _num(x: Optional[float], digits: int = 3) -> str:
    if x is None:
        return "–"
    if x == 0:
        return "0"
    mag = math.floor(math.log10(abs(x)))
    return f"{x:.{max(0, digits - 1 - mag)}f}"


def _mem(n: Optional[int]) -> str:
    if n is None:
        return "–"
    return f"{n / 2**20:.0f} MB" if n < 2**30 else f"{n / 2**30:.2f} GB"


def _memory_kind(machine: dict) -> str:
    return "torch.cuda.max_memory_allocated" if machine["device_kind"] == "cuda" else "the resident set size"


def _status(c: dict) -> str:
    if c["status"] == "ok":
        return "ok"
    return f"**{c['status']}**" + (f": {c['reason']}" if c["reason"] else "")


def _groups(doc: dict):
    """Cells grouped by (workload, case, mode), in run order."""
    groups: dict = {}
    for c in doc["cells"]:
        groups.setdefault((c["workload"], c["case"], c["mode"]), []).append(c)
    return groups


def summary_rows(doc: dict) -> list[dict]:
    """Per (workload, case, mode): the fastest peer and the fastest correct vitkern cell."""
    rows = []
    for (wl, case, mode), cells in _groups(doc).items():
        ok = [c for c in cells if c["status"] == "ok"]
        peer = min((c for c in ok if c["family"] == "peer"), key=lambda c: c["total_ms"], default=None)
        vk = min((c for c in ok if c["family"] == "vitkern"), key=lambda c: c["total_ms"], default=None)
        issues = [f"{c['peer']} {c['status']}" for c in cells if c["family"] == "vitkern" and c["status"] != "ok"]
        rows.append({"workload": wl, "case": case, "mode": mode, "best_peer": peer, "best_vitkern": vk,
                     "vitkern_issues": issues})
    return rows


def markdown(doc: dict) -> str:
    m = doc["machine"]
    unit, scale = _unit(doc)
    cfg = doc["config"]
    lines = [f"# vitkern attention benchmark: {m['device_name']}", "",
             f"{m['date_utc']} · torch {m['torch']} · triton {m['triton']} · vitkern {m['vitkern']} "
             f"(commit {m['git_commit']}) · {cfg['dtype']} · {m['torch_threads']} threads · "
             f"{m['cpu_count']} CPU cores · {m['memory_gib']} GiB RAM"
             + (" · **quick smoke run**" if cfg["quick"] else ""),
             "", f"Command: `{cfg['command']}`. {_yardsticks(cfg, unit, scale)} {_budget(cfg)}"
                 + (f" Allocator: {cfg['allocator']} (freed memory is reused, so no peer's time includes page "
                    f"faults that depend on the allocator's history)." if cfg.get("allocator") else ""), "",
             f"Times are medians of repeated calls after a warm-up, the cells of a table timed round-robin (one call "
             f"of each per round); *prep* is building per-batch metadata (masks), "
             f"timed apart and included in *total*. {unit} counts **useful** work only: 4·D FLOPs per unmasked "
             f"(query, key) pair per head for the forward, 3.5× that for forward+backward, divided by the total time. "
             f"Peak memory is {_memory_kind(m)} "
             f"above the cell's baseline during its first call. × naive and × best peer compare total times; "
             f"every cell's output (and gradients) were checked against the first peer of its table before timing.",
             "", _isa_line(m), "", "## Summary", "",
             f"| workload | case | mode | best peer | ms | best vitkern (kernel path) | ms | {unit} | % matmul | "
             f"× best peer | vitkern not ok |",
             "|---|---|---|---|---:|---|---:|---:|---:|---:|---|"]
    rate = cfg.get("matmul_rates", {}).get(cfg["dtype"]) or cfg["options"].get("matmul_rate")
    for r in summary_rows(doc):
        p, v = r["best_peer"], r["best_vitkern"]
        pct = _num(100 * v["useful_tflops"] * 1e12 / rate) if v and rate else "–"
        lines.append(f"| {r['workload']} | {r['case']} | {MODE_NAMES[r['mode']]} | {p['peer'] if p else '–'} | "
                     f"{_num(p['total_ms']) if p else '–'} | {_peer_name(v, bold=False) if v else '–'} | "
                     f"{_num(v['total_ms']) if v else '–'} | {_num(v['useful_tflops'] * scale) if v else '–'} | "
                     f"{pct} | "
                     f"{_num(v['speedup_vs_best_peer']) if v and v['speedup_vs_best_peer'] else '–'} | "
                     f"{', '.join(r['vitkern_issues']) or '–'} |")
    current = None
    for (wl, case, mode), cells in _groups(doc).items():
        if wl != current:
            current = wl
            info = doc["workloads"].get(wl, {})
            lines += ["", f"## {wl}", "", info.get("description", "")]
            for cd in info.get("cases", []):
                extra = {k: v for k, v in cd.items() if k in ("useful_fraction", "images_per_pack", "padding_fraction",
                                                              "image_tokens_min_max", "system")}
                if extra:
                    lines.append(f"- {cd['label']}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in extra.items()))
        lines += ["", f"### {case}, {MODE_NAMES[mode]}", "",
                  f"| peer | status | median ms | prep ms | total ms | {unit} | peak mem | × naive | × best peer |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for c in cells:
            name = _peer_name(c)
            comp = f" (compile {c['compile_s']:.1f} s)" if c.get("compile_s") else ""
            lines.append(f"| {name} | {_status(c)}{comp} | {_num(c['time_ms'])} | {_num(c['prep_ms'])} | "
                         f"{_num(c['total_ms'])} | {_num(c['useful_tflops'] * scale if c['useful_tflops'] else None)} | "
                         f"{_mem(c['peak_mem_bytes'])} | {_num(c['speedup_vs_naive'])} | "
                         f"{_num(c['speedup_vs_best_peer'])} |")
    lines += ["", "## Peers", ""] + [f"- **{k}**: {v}" for k, v in sorted(doc["peers"].items())] + [""]
    return "\n".join(lines)


def _peer_name(c: dict, bold: bool = True) -> str:
    """A vitkern cell's name with the kernel path it ran (e.g. "vitkern-cpu · fp32 (BLAS)")."""
    if c["family"] != "vitkern":
        return c["peer"]
    name = f"**{c['peer']}**" if bold else c["peer"]
    return name + (f" · {c['kernel_path']}" if c.get("kernel_path") else "")


def _yardsticks(cfg: dict, unit: str, scale: float) -> str:
    rates = cfg.get("matmul_rates") or {cfg["dtype"]: cfg["options"]["matmul_rate"]}
    both = " (each the higher of a sample before the cells and one after)" if cfg.get("matmul_rates_start_end") else ""
    return ("Square matmul in this run (the yardsticks): "
            + ", ".join(f"{name} {_num(r / 1e12 * scale)} {unit}" for name, r in rates.items()) + both + ".")


def _budget(cfg: dict) -> str:
    wall = f" The run took {cfg['wall_s']} s." if cfg.get("wall_s") is not None else ""
    budget = cfg.get("time_budget_s")
    if budget is None or budget == "inf" or (isinstance(budget, float) and math.isinf(budget)):
        return "No time budget: every cell timed however long it takes." + wall
    return (f"Time budget {budget:.0f} s, shared out among the cells as the run went (see benchmarks/README.md); "
            f"a cell whose one call needed more than its share reads **too slow**." + wall)


def _isa_line(m: dict) -> str:
    flags = m.get("cpu_flags") or {}
    kern = m.get("cpu_kernel")
    chosen = kern.get("chosen") if isinstance(kern, dict) else None
    paths = ", ".join(f"{k} → {p}" for k, p in chosen.items()) if chosen else f"{kern or 'not reported'}"
    if not flags and not kern:
        return ""
    return (f"CPU ISA: {' '.join(f for f, on in flags.items() if on) or 'unknown'}. vitkern `cpu` kernel paths "
            f"chosen: {paths}.")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


# ---------------------------------------------------------------------------------------------- plot


_SHORT_STATUS = {"OOM": "OOM", "WRONG": "wrong", "unsupported": "n/a", "skipped": "skip", "error": "error",
                 "too slow": "slow"}


def plot(doc: dict, path: Path) -> None:
    """One panel per workload: useful throughput of each peer, one bar per case and mode."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    unit, scale = _unit(doc)
    workloads = list(dict.fromkeys(c["workload"] for c in doc["cells"]))
    if not workloads:
        workloads = ["(no cells)"]
    cols = min(2, len(workloads))
    rows = math.ceil(len(workloads) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(8 * cols, 4.2 * rows), squeeze=False)
    for ax, wl in zip(axes.flat, workloads):
        cells = [c for c in doc["cells"] if c["workload"] == wl]
        peers = list(dict.fromkeys(c["peer"] for c in cells))
        series = list(dict.fromkeys((c["case"], c["mode"]) for c in cells))
        width = 0.8 / max(1, len(series))
        colors = plt.get_cmap("tab10" if len(series) <= 10 else "tab20").colors
        any_bar = False
        for i, (case, mode) in enumerate(series):
            color = colors[i % len(colors)]
            xs, ys, notes = [], [], []
            for j, p in enumerate(peers):
                c = next((c for c in cells if c["peer"] == p and c["case"] == case and c["mode"] == mode), None)
                x = j + (i - (len(series) - 1) / 2) * width
                if c is not None and c["status"] == "ok" and c["useful_tflops"]:
                    xs.append(x)
                    ys.append(c["useful_tflops"] * scale)
                elif c is not None:
                    notes.append((x, _SHORT_STATUS.get(c["status"], c["status"])))
            ax.bar(xs, ys, width=width, color=color)
            any_bar = any_bar or bool(xs)
            for x, text in notes:
                ax.text(x, 0, text, rotation=90, ha="center", va="bottom", fontsize=7, color=color)
        ax.set_ylim(bottom=0)
        ax.set_xlim(-0.6, len(peers) - 0.4)
        if not any_bar:
            ax.set_ylim(0, 1)
            ax.text(0.5, 0.6, "no timed cell (see the markdown for why)", transform=ax.transAxes, ha="center",
                    fontsize=9, color="gray")
        ax.set_xticks(range(len(peers)))
        ax.set_xticklabels(peers, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(f"useful {unit}")
        ax.set_title(wl + (f" ({cells[0]['case']})" if len({c['case'] for c in cells}) == 1 else ""), fontsize=10)
        handles = [Patch(color=colors[i % len(colors)], label=f"{MODE_NAMES[m]}" + (
            f" · {c}" if len({s[0] for s in series}) > 1 else "")) for i, (c, m) in enumerate(series)]
        ax.legend(handles=handles, fontsize=7 if len(series) > 4 else 8, ncol=2 if len(series) > 4 else 1)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(workloads):]:
        ax.axis("off")
    m = doc["machine"]
    fig.suptitle(f"vitkern attention benchmark: {m['device_name']}, {doc['config']['dtype']}, {m['date_utc'][:10]}",
                 fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(doc: dict, paths: dict, with_plot: bool = True) -> None:
    doc = clean_floats(doc)
    write_json(doc, paths["json"])
    text = markdown(doc)
    paths["md"].write_text(text)
    if "latest" in paths:
        paths["latest"].write_text(text)
    if with_plot:
        plot(doc, paths["png"])
