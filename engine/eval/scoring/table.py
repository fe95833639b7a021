"""The paper's Table 2 for any set of sample folders: mean score per metric per model, and the
gain over a base model (relative in percent; absolute for ImageReward, whose base sits near 0).

A model's mean is the mean over prompts of the per-prompt mean over that prompt's images (the
paper generates 4 images a prompt and reports the average reward).
"""

import math


def gain(value: float, base: float, kind: str) -> float | None:
    """`relative`: 100 * (value - base) / |base| (None for a base of 0); `absolute`: value - base."""
    if kind == "absolute":
        return value - base
    if base == 0:
        return None
    return 100.0 * (value - base) / abs(base)


def summarize(per_prompt: dict[str, dict[str, list[float]]], gains: dict[str, str], base: str | None) -> dict:
    """per_prompt[model][metric] -> the per-prompt scores; gains[metric] -> `relative`/`absolute`."""
    if base is not None and base not in per_prompt:
        raise ValueError(f"base {base!r} is not among the models ({', '.join(per_prompt)})")
    metrics = list(gains)
    rows = []
    for model, scores in per_prompt.items():
        means = {m: math.fsum(scores[m]) / len(scores[m]) for m in metrics}
        rows.append({"model": model, "prompts": len(next(iter(scores.values()))), "mean": means})
    by_name = {row["model"]: row for row in rows}
    if base is not None:
        base_means = by_name[base]["mean"]
        for row in rows:
            if row["model"] != base:
                row["gain"] = {m: gain(row["mean"][m], base_means[m], gains[m]) for m in metrics}
        rows.sort(key=lambda row: row["model"] != base)  # base first, the others in the order given
    return {"metrics": metrics, "gain_kind": gains, "base": base, "models": rows}


def _cell(row: dict, metric: str, kind: str) -> str:
    text = f"{row['mean'][metric]:.4g}"
    if "gain" in row:
        value = row["gain"][metric]
        if value is None:
            text += " (n/a)"
        elif kind == "absolute":
            text += f" ({value:+.3f})"
        else:
            text += f" ({value:+.1f}%)"
    return text


def to_markdown(table: dict) -> str:
    metrics = table["metrics"]
    lines = [
        "| model | prompts | " + " | ".join(metrics) + " |",
        "|---|---:|" + "---:|" * len(metrics),
    ]
    for row in table["models"]:
        name = row["model"] + (" (base)" if row["model"] == table["base"] else "")
        cells = [_cell(row, m, table["gain_kind"][m]) for m in metrics]
        lines.append(f"| {name} | {row['prompts']} | " + " | ".join(cells) + " |")
    if table["base"] is not None:
        kinds = ", ".join(
            f"{m}: {'difference' if k == 'absolute' else 'percent'}" for m, k in table["gain_kind"].items()
        )
        lines.append(f"\nGain over {table['base']} in brackets ({kinds}).")
    return "\n".join(lines) + "\n"
