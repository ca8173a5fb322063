"""Published RMSEs beside the project's numbers (``docs/results/LITERATURE.md`` and the results
page's *Literature* section), with split type and citation, so that a reader sees where the
project's CPU-sized models stand.

Test RMSE, mean ± std over the papers' own repeats. The papers use random splits (80/10/10), as
the project does, but other seeds, featurisations and model sizes: the rows place the project's
numbers, they are no paired comparison. A cell is filled only where the number was read in a
source named in the row ("where read"); a cell we could not check is "not checked", never a
number from memory.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

#: (model, source, where read, split, ESOL, FreeSolv, Lipophilicity)
ROWS = (
    ("MoleculeNet's best graph model (MPNN on ESOL and FreeSolv, GraphConv on Lipophilicity)",
     "Wu et al. 2018, Chem. Sci. 9, 513 (MoleculeNet)",
     "the regression table of the chemprop README (github.com/chemprop/chemprop, 2019), column "
     "'GraphConv/MPNN (deepchem)'",
     "random", "0.58 ± 0.03", "1.15 ± 0.12", "0.655 ± 0.036"),
    ("AttentiveFP",
     "Xiong et al. 2020, J. Med. Chem. 63, 8749 (doi 10.1021/acs.jmedchem.9b00959)",
     "its Supplementary Table 6, test column, as transcribed with the paper's split code (8:1:1 "
     "random) in a public paper-notes repository; Lipophilicity is not in that transcription",
     "random", "0.503 ± 0.076", "0.736 ± 0.037", "not checked"),
)  # fmt: skip

NOTE = (
    "Test RMSE from the papers (mean ± std over their repeats); random splits like the project's, "
    "but other seeds, featurisations and model sizes: a reference point, not a paired comparison. "
    "'not checked': no source we could read gives that cell; we leave it empty rather than quote "
    "it from memory. The project's AttentiveFP runs use PyG's implementation and example settings "
    "(examples/attentive_fp.py), which follow Xiong et al.; its MolGNN follows the MPNN of "
    "Gilmer et al. 2017 as benchmarked in MoleculeNet."
)

#: The project's GNN tasks, in the table's column order.
TASKS = ("esol_gnn", "freesolv_gnn", "lipo_gnn")


def project_rows(runs) -> list[tuple[str, ...]]:
    """The project's own rows, from a report's runs (:class:`~score_exp.report.runs.Run`): test
    RMSE mean ± std (n) of each GNN model per experiment, the peer's (``reference``) and MolGNN's
    (by depth preset); ok runs only."""
    cells: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        rec = run.record
        rmse = (rec.test or {}).get("rmse")
        if not run.ok or run.task not in TASKS or rmse is None:
            continue
        model = "AttentiveFP (PyG)" if rec.reference else f"MolGNN, depth={rec.depth_preset}"
        cells[(str(rec.experiment or "?"), model)][run.task].append(float(rmse))
    rows = []
    for (experiment, model), by_task in sorted(cells.items()):
        vals = []
        for task in TASKS:
            xs = by_task.get(task, [])
            sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
            vals.append(f"{statistics.fmean(xs):.3f} ± {sd:.3f} (n={len(xs)})" if xs else "")
        rows.append((f"this project: {model}", f"`{experiment}`", "random", *vals))
    return rows


def markdown(runs=()) -> str:
    """The literature table, then (given a report's runs) the project's rows beside it."""
    lines = ["# The literature beside these results", "",
             "| model | source | where read | split | ESOL | FreeSolv | Lipophilicity |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    lines += ["| " + " | ".join(row) + " |" for row in ROWS]
    ours = project_rows(runs)
    if ours:
        lines += ["", "The project's GNN runs in this snapshot (test RMSE, mean ± std over seeds):",
                  "", "| model | experiment | split | ESOL | FreeSolv | Lipophilicity |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        lines += ["| " + " | ".join(row) + " |" for row in ours]
    return "\n".join(lines + ["", NOTE, ""])
