"""Write the benchmarks page of the docs and the results table of the README from ``benchmarks/results/``.

    python benchmarks/summary.py            # rewrites docs/benchmarks.md and the marked table in README.md
    python benchmarks/summary.py --check    # exit 1 if either, or a result's .md, is out of date (no file written)

No fit is run: every number is read from the current result file of a benchmark script (``RESULTS`` below: one
file per script, the name the script writes by default). Rerun a script, then this, and commit both.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS_DIR = HERE / "results"
PAGE = ROOT / "docs" / "benchmarks.md"
README = ROOT / "README.md"
BEGIN = "<!-- results table: written by python benchmarks/summary.py -->"
END = "<!-- end of results table -->"
DATASETS = ["ifnb", "worm", "bladder", "pbmc", "kidney"]

#: (script, result stem, what it measures), in the order of the page; a stem without a file is left out.
RESULTS: list[tuple[str, str, str]] = [
    ("bench_real.py", "real",
     "CplMixVAE (the default fit; with `cpl-k`, K given), scVI + Leiden and PCA + Leiden on the five real sets over "
     "seeds: ARI, NMI, chosen K, agreement between seeds, time, and the difference of the mean ARIs."),
    ("bench_real.py --datasets ifnb --condition none registered", "real_condition",
     "ifnb with and without its condition (control or interferon-β-stimulated) registered, as a user of each method "
     "would register it: CplMixVAE's `condition_key`, scVI's `batch_key` (`+condition`); PCA + Leiden cannot use it. "
     "The default fit (K unknown) over seeds: ARI, chosen K, agreement between seeds, time."),
    ("bench_real.py --methods cpl-k", "real_k",
     "CplMixVAE given the reference number of types on the five real sets, next to the peers (same seed)."),
    ("bench_simulated.py", "pruning",
     "Choice of the number of types on the simulator (8 types): chosen K, ARI, agreement of two model seeds."),
    ("bench_simulated.py --parts states", "states",
     "Types and states with K given over simulated regimes (state programs on 2-10% of the genes, effects 0.35-2.25 "
     "log units, type-specific or shared, 2-10 types, of equal or, in `unbalanced`, unequal sizes): the best state "
     "coordinate's |Spearman| with the true state against a PCA within each true type and within each of the "
     "model's types, and the types against their Leiden start and PCA + Leiden."),
    ("bench_simulated.py --parts subtle_k", "subtle_k",
     "The default fit (K unknown) on the subtle types of `states` (10 types differing in 2% of the genes) against PCA "
     "+ Leiden on the same data: chosen K and ARI per seed. A `chosen_k` other than the last K of `k_path`: no "
     "pruning round reached the consensus threshold, and the fit took the number of Leiden clusters at resolution 1 "
     "as K given. Its `seconds` were measured beside another benchmark on the two cores: compare them with nothing."),
    ("bench_state_genes.py", "state_genes",
     "Interferon-β-stimulated PBMCs with the condition registered: interferon-stimulated genes among each type's "
     "state genes, AUROC of control vs stimulated along the state (each reference type along its majority type's "
     "axis; `own_frame`: each cell along its own type's), cell-type ARI, each fit's ARI to its own Leiden "
     "start, the share of cells in types split by condition, and the agreement between the seeds' types."),
    ("bench_speed.py", "speed",
     "Speed against scVI on simulated data, one CPU thread: seconds per step and FLOP/s (`throughput`), the whole "
     "fit (`wholefit`), 10^4 to 10^6 cells (`scale`), two fits side by side (`side-by-side`); the file holds the "
     "parts its command ran."),
    ("gpu.sh", "speed_gpu", "`bench_speed.py --parts throughput` on one GPU, float32."),
    ("gpu.sh", "speed_gpu_bf16mixed", "`bench_speed.py --parts throughput` on one GPU, bf16 mixed precision."),
    ("gpu.sh", "speed_gpu_compile",
     "`bench_speed.py --parts throughput` on one GPU with `torch.compile` for CplMixVAE only: scVI, the reference of "
     "`ratio_to_scvi`, ran uncompiled, so that ratio is not like for like."),
]  # fmt: skip


def load(stem: str) -> dict:
    return json.loads((RESULTS_DIR / f"{stem}.json").read_text())


def _range(values: list[float], fmt: str = "{:.0f}") -> str:
    lo, hi = min(values), max(values)
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}–{fmt.format(hi)}"


def comparison() -> tuple[dict, dict]:
    """Per set, the numbers of the table, and the difference of the means, from ``real`` (bench_real.py)."""
    rows = load("real")["rows"]
    cpl, peer = "CplMixVAE", "scVI+Leiden"
    mean = {r["method"]: r for r in rows if r["part"] == "mean"}
    table = {}
    for ds in DATASETS:
        fits = {m: [r for r in rows if r["part"] == "fit" and r["dataset"] == ds and r["method"] == m] for m in mean}
        seeds = next(r for r in rows if r["part"] == "seeds" and r["dataset"] == ds and r["method"] == cpl)
        table[ds] = {
            "k_ref": fits[cpl][0]["k_ref"], "k": [r["chosen_k"] for r in fits[cpl]],
            "clusters": [r["n_clusters"] for r in fits[peer]], "ari": mean[cpl][ds], "ari_peer": mean[peer][ds],
            "agreement": seeds["ari_between_seeds"], "minutes": [r["seconds"] / 60 for r in fits[cpl]],
            "minutes_peer": [r["seconds"] / 60 for r in fits[peer]],
        }  # fmt: skip
    diff = next(r for r in rows if r["part"] == "difference" and r["method"] == cpl)
    table["mean"] = {"ari": mean[cpl]["ari"], "ari_peer": mean[peer]["ari"]}
    return table, {
        "difference": diff["difference"], "low": diff["interval_90_low"], "high": diff["interval_90_high"],
        "n": diff["n_seeds"], "n_peer": diff["n_seeds_versus"],
    }  # fmt: skip


def comparison_table() -> str:
    """Per real set: the default fit over its seeds next to scVI + Leiden."""
    table, _ = comparison()
    lines = [
        "| data set | types | K, scmixvae | clusters, scVI+Leiden | ARI, scmixvae | ARI, scVI+Leiden "
        "| seed agreement, scmixvae | minutes, scmixvae | minutes, scVI+Leiden |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for ds in DATASETS:
        t = table[ds]
        lines.append(
            f"| {ds} | {t['k_ref']} | {_range(t['k'])} | {_range(t['clusters'])} | {t['ari']:.3f} "
            f"| {t['ari_peer']:.3f} | {t['agreement']:.2f} | {_range(t['minutes'])} | {_range(t['minutes_peer'])} |"
        )
    lines.append(f"| **mean** | | | | **{table['mean']['ari']:.3f}** | **{table['mean']['ari_peer']:.3f}** | | | |")
    return "\n".join(lines)


def _body(stem: str) -> str:
    """The result file's markdown without its title."""
    lines = (RESULTS_DIR / f"{stem}.md").read_text().splitlines()
    return "\n".join(lines[1:]).strip()


def page() -> str:
    table, diff = comparison()
    per_set = [table[ds]["ari"] - table[ds]["ari_peer"] for ds in DATASETS]
    parts = [
        "# Benchmarks",
        "",
        "Written by `python benchmarks/summary.py` from the current result file of each benchmark script in "
        "`benchmarks/results/`; do not edit by hand. What each script measures, and how to rerun it: "
        "`benchmarks/README.md`. Compare methods only within one table: one machine, one run, one thread count.",
        "",
        "## The default fit against scVI + Leiden",
        "",
        "The five real sets of `benchmarks/README.md` (reference types from the authors' annotations). scmixvae: "
        "`CplMixVAE(adata).train()` with every default (the number of types is not given) but the state phase, "
        "which changes no type (`--state-epochs 0`); scVI + Leiden: scVI's default model and training, Leiden at "
        "resolution 1 on its latent. One CPU thread per fit. From `real` (`bench_real.py`): scmixvae's K over its "
        "seeds, the mean ARI between the labels of two seeds, the mean ARIs over the seeds of each method, minutes "
        "per fit (scmixvae's without the state phase).",
        "",
        comparison_table(),
        "",
        f"Difference of the mean ARIs (scmixvae minus scVI + Leiden): {diff['difference']:+.3f}, 90% bootstrap "
        f"interval {diff['low']:+.3f} to {diff['high']:+.3f} ({diff['n']} and {diff['n_peer']} seeds). The interval "
        f"holds the seed-to-seed spread only: per set the differences run from {min(per_set):+.3f} to "
        f"{max(per_set):+.3f}, and {sum(d > 0 for d in per_set)} of the {len(per_set)} sets favour scmixvae, so it "
        "says nothing of data sets beyond these five.",
    ]
    for script, stem, what in RESULTS:
        if (RESULTS_DIR / f"{stem}.json").is_file():
            parts += ["", f"## `{stem}`: {script}", "", what, "", _body(stem)]
    return "\n".join(parts) + "\n"


def readme(text: str) -> str:
    """README.md with the table between the markers replaced."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"README.md lacks the markers {BEGIN!r} and {END!r} around the results table")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{comparison_table()}\n{END}{tail}"


def results_out_of_step() -> list[str]:
    """Result files whose ``.md`` does not show its ``.json``: the table of its rows and its command."""
    sys.path.insert(0, str(HERE))
    from _common import markdown_table

    stale = []
    for path in sorted(RESULTS_DIR.glob("*.json")):
        result = json.loads(path.read_text())
        md = path.with_suffix(".md")
        text = md.read_text() if md.is_file() else ""
        command = result["command"].removeprefix("python ")  # older files recorded it without the interpreter
        if markdown_table(result["rows"]) not in text or f"`{command}`" not in text.replace("`python ", "`"):
            stale.append(md.name)
    return stale


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--check",
        action="store_true",
        help="only check that the page and the README are current, and that each result's .md shows its .json",
    )
    args = p.parse_args(argv)
    wanted = {PAGE: page(), README: readme(README.read_text())}
    stale = [path.name for path, text in wanted.items() if not path.is_file() or path.read_text() != text]
    if args.check:
        stale += results_out_of_step()  # a .md is written by its script, not here: rerun the script
        if stale:
            print(
                f"out of date: {', '.join(stale)}; run python benchmarks/summary.py (for a result's .md, rerun its "
                "script)",
                file=sys.stderr,
            )
        return 1 if stale else 0
    for path, text in wanted.items():
        path.write_text(text)
    print(f"wrote {', '.join(str(path.relative_to(ROOT)) for path in wanted)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
