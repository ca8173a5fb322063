"""``score-bench``'s reporting side: ratios between variants, memory growth, the text table."""

from __future__ import annotations


def _median_step(r: dict) -> float:
    """The step time ratios use: interleaved when measured, else the variant's own run."""
    return r["interleaved"]["step_s_median"] if "interleaved" in r else r["step_s_median"]


def ratios(results: list[dict]) -> list[dict]:
    """Each variant over the variant that differs from it in one setting, at its first value.

    With presets (stacked, score) and integrators (euler, heun, rk4): heun/euler and rk4/euler
    within each preset, score/stacked within each integrator, and each ``--variant`` over the
    same preset and integrator without its overrides (``NAME/base``, whatever its step count);
    the NFE ratio sits beside each.
    """
    dims = ("integrator", "preset", "variant")
    key = lambda r: (*(r.get(d, "base") for d in dims), r["steps"], r["checkpoint"])  # noqa: E731
    by_key = {key(r): r for r in results}
    first = {d: results[0].get(d, "base") for d in dims}
    out = []
    for r in results:
        for dim in dims:
            if r.get(dim, "base") == first[dim]:
                continue
            # The same in every other setting, at the first value of this one (a --variant may
            # change the step count: it is compared with its base whatever the counts).
            at = tuple(first[d] if d == dim else r.get(d, "base") for d in dims)
            ref = by_key.get(at + (r["steps"], r["checkpoint"]))
            if dim == "variant":
                ref = next((q for q in results if key(q)[:3] == at), None)
            if ref is None:
                continue
            out.append(
                {
                    "name": f"{r.get(dim, 'base')}/{ref.get(dim, 'base')}",
                    "at": f"{dim}s compared at "
                    + (f"depth={r['preset']}" if dim == "integrator" else r["integrator"]),
                    "of": r["label"],
                    "over": ref["label"],
                    "step_time": _median_step(r) / _median_step(ref),
                    "throughput": _median_step(ref) / _median_step(r),
                    "interleaved": "interleaved" in r and "interleaved" in ref,
                    "nfe": r["nfe"] / ref["nfe"],
                    "params": r["params"] / ref["params"],
                }
            )
    return out


def checkpoint_growth(results: list[dict]) -> dict:
    """Peak training memory growth from the fewest to the most steps, with and without."""
    out = {}
    for ckpt in (False, True):
        rows = sorted((r for r in results if r["checkpoint"] == ckpt), key=lambda r: r["steps"])
        if len(rows) < 2:
            continue
        lo, hi = rows[0], rows[-1]
        entry = {"from_steps": lo["steps"], "to_steps": hi["steps"]}
        for field in ("train_mem_mb", "peak_mem_mb"):
            if lo[field] and hi[field] is not None:
                entry[f"{field}_growth_pct"] = 100.0 * (hi[field] / lo[field] - 1.0)
        out[f"checkpoint={str(ckpt).lower()}"] = entry
    return out


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def report(payload: dict) -> str:
    unit = payload["variants"][0]["unit"]
    lines = [
        f"# score-bench {payload['task']} on {payload['device']} ({payload['threads']} threads, "
        f"torch {payload['torch']}): median of {payload['repeats']} repeats x "
        f"{payload['steps_per_repeat']} steps after {payload['warmup']} warm-up steps",
        f"{'variant':<34}{'params':>12}{'nfe':>5}{'step ms':>10}{'min-max ms':>18}"
        f"{unit + '/s':>14}{'peak MB':>10}{'train MB':>10}{'interleaved ms':>16}"
        f"{'TFLOP/s':>9}{'MFU':>7}",
    ]
    for r in payload["variants"]:
        inter = 1e3 * r["interleaved"]["step_s_median"] if "interleaved" in r else None
        lines.append(
            f"{r['label']:<34}{r['params']:>12,}{r['nfe']:>5}{1e3 * r['step_s_median']:>10.2f}"
            f"{1e3 * r['step_s_min']:>9.2f}-{1e3 * r['step_s_max']:<8.2f}{r['throughput']:>14,.0f}"
            f"{_fmt(r['peak_mem_mb'], '.0f'):>10}{_fmt(r['train_mem_mb'], '.1f'):>10}"
            f"{_fmt(inter, '.2f'):>16}{_fmt(r.get('achieved_tflops'), '.3f'):>9}"
            f"{_fmt(r.get('mfu'), '.1%'):>7}"
        )
    if payload["ratios"]:
        basis = "interleaved" if all(q["interleaved"] for q in payload["ratios"]) else "own run"
        lines += [
            "",
            f"{'ratio':<18}{'of':<34}{'step time (' + basis + ')':>24}{'nfe':>6}{'params':>8}",
        ]
        for q in payload["ratios"]:
            lines.append(
                f"{q['name']:<18}{q['of']:<34}{q['step_time']:>24.3f}{q['nfe']:>6.2f}"
                f"{q['params']:>8.3f}"
            )
    if any("lightning" in r for r in payload["variants"]):
        lines += [
            "",
            f"{'Lightning vs bare (interleaved)':<34}{'bare/s':>14}{'Lightning/s':>14}{'ratio':>8}",
        ]
        for r in payload["variants"]:
            lt = r["lightning"]
            lines.append(
                f"{r['label']:<34}{lt['bare_interleaved']['throughput']:>14,.0f}"
                f"{lt['throughput']:>14,.0f}{lt['throughput_ratio']:>8.3f}"
            )
    for name, g in payload.get("checkpoint_memory", {}).items():
        lines.append(
            f"{name}: train memory {g['from_steps']} -> {g['to_steps']} steps: "
            f"{_fmt(g.get('train_mem_mb_growth_pct'), '+.1f')}% "
            f"(peak incl. process: {_fmt(g.get('peak_mem_mb_growth_pct'), '+.1f')}%)"
        )
    r0 = payload["variants"][0]
    if "flops_note" in r0:  # how the FLOPs were counted and which peak the MFU is of
        lines.append(f"FLOPs: {r0['flops_note']}; MFU: {r0['mfu_note']}")
    lines += [f"note: {n}" for n in payload["notes"]]
    return "\n".join(lines)
