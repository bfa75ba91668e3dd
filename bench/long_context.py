"""Long-context memory: the slope of peak memory against context length, and what it allows.

bench/run.py --slope runs Llama-3-8B NF4 at 1 x 16384, 1 x 32768 and 1 x 65536 for each
system; this file turns those peaks into one row per system:

    slope      b = least-squares fit of peak GiB = a + b * tokens over every point measured
                   (three, or two if one failed), reported per 1,000 tokens
    longest    (budget - a) / b tokens: where that line crosses a GPU's memory

Least squares rather than the first-to-last pair, so that one noisy point moves the slope
less. "Longest" extrapolates the line past the longest context measured: an estimate, and
only as good as the growth is linear (activations are; flash attention keeps no scores).
"""

SLOPE_CONFIGS = "8b:nf4:1x16384,8b:nf4:1x32768,8b:nf4:1x65536"
MIN_SEQ = 16384  # batch-1 rows from here on are the long-context points
# The two memories of the issue: an "80 GB" card (80e9 bytes, 74.5 GiB, e.g. A100/H100 80GB
# less what the driver keeps) and the GPU machine's H200 (139 GiB usable).
BUDGETS_GIB = {"80 GB": 80e9 / 2**30, "139 GiB": 139.0}


def fit_line(points):
    """Least-squares (intercept GiB, GiB per token) of peak GiB over context tokens, from
    (tokens, GiB) pairs with at least two distinct token counts."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    if sxx == 0:
        raise ValueError("a slope needs at least two different context lengths")
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sxx
    return mean_y - slope * mean_x, slope


def longest_context(intercept, slope, budget_gib):
    """Tokens at which the fitted line reaches budget_gib, to the nearest token (None if
    memory does not grow)."""
    return None if slope <= 0 else round((budget_gib - intercept) / slope)


def slope_rows(results):
    """{(system, model, weights): [(seq, peak GiB), ...]} of the batch-1 long-context results
    that did not fail, sorted by seq."""
    groups = {}
    for r in results:
        if r["batch"] == 1 and r["seq"] >= MIN_SEQ and "error" not in r:
            groups.setdefault((r["system"], r["model"], r["weights"]), []).append((r["seq"], r["peak_gib"]))
    return {key: sorted(points) for key, points in groups.items()}


def print_slope_table(results, names):
    """The long-context table, if the results hold two or more long contexts of one system."""
    groups = slope_rows(results)
    if not any(len({seq for seq, _ in points}) >= 2 for points in groups.values()):
        return
    fits = {key: fit_line(points) for key, points in groups.items() if len({seq for seq, _ in points}) >= 2}
    print("\nLong context: peak memory at batch 1 (GiB by context), its least-squares slope, and the longest "
          "context that slope puts within each memory")
    print("| system | model | base weights | peak GiB by context | GiB per 1,000 tokens | "
          + " | ".join(f"longest context within {b}" for b in BUDGETS_GIB) + " | slope vs Unsloth |")
    print("|---|---|---|---|---|" + "---|" * len(BUDGETS_GIB) + "---|")
    for key, points in groups.items():
        system, model, weights = key
        measured = ", ".join(f"{seq}: {gib:.2f}" for seq, gib in points)
        row = f"| {names[system]} | {model} | {weights} | {measured} |"
        if key not in fits:
            print(row + " one context only |" + " |" * len(BUDGETS_GIB) + " |")
            continue
        intercept, slope = fits[key]
        longest = [longest_context(intercept, slope, gib) for gib in BUDGETS_GIB.values()]
        unsloth = fits.get(("unsloth", model, weights))
        ratio = f"{slope / unsloth[1]:.2f}x" if unsloth and system != "unsloth" and unsloth[1] > 0 else ""
        print(row + f" {slope * 1000:.3f} | "
              + " | ".join("no growth" if t is None else f"{t:,}" for t in longest) + f" | {ratio} |")
