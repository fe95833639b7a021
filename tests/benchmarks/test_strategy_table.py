"""README's strategy table is what `vipo plan` traces (benchmarks/strategy_table.py)."""

import json

import pytest

from vipo.benchmarks import strategy_table as table

TINY = table.RECIPES[0]


@pytest.fixture(scope="module")
def committed():
    return json.loads(table.RESULTS.read_text())


def test_readme_shows_the_committed_traces(committed):
    assert table.readme_table(table.README.read_text()) == table.render_table(committed)
    assert set(committed["recipes"]) == set(table.RECIPES) == set(committed["rows"])
    assert "traced, not measured on a GPU" in table.render_table(committed)


def test_a_fresh_plan_of_the_tiny_recipe_renders_its_readme_row(committed):
    """Traced again now, under each strategy on 8 (fake) GPUs: README's row must not have drifted
    from what the plan says today."""
    fresh = {"recipe_strategy": table.recipe_strategy(TINY)}
    fresh |= {strategy: table.plan_entry(TINY, strategy) for strategy in table.STRATEGIES}
    fresh["baseline"] = table.baseline_entry(TINY)
    row = table.render_row(TINY, fresh, {})
    assert row in table.readme_table(table.README.read_text()).splitlines()
    for cell in table.CELLS:  # the numbers themselves, not only their rounding
        assert fresh[cell]["peak_bytes_per_gpu"] == committed["rows"][TINY][cell]["peak_bytes_per_gpu"]
    # fsdp on 8 ranks shards what ddp replicates: less per GPU, with the same pair per GPU; a tiny
    # model's ZeRO step is DeepSpeed's gradient buckets (two under ZeRO-2, one under ZeRO-3)
    assert fresh["fsdp"]["peak_bytes_per_gpu"] < fresh["ddp"]["peak_bytes_per_gpu"]
    assert fresh["zero3"]["peak_bytes_per_gpu"] < fresh["zero2"]["peak_bytes_per_gpu"]
    assert fresh["fsdp"]["pairs_per_gpu"] == fresh["ddp"]["pairs_per_gpu"] == 1


def test_cells_say_what_the_plan_found():
    entry = {
        "pairs_per_gpu": 2,
        "peak_bytes_per_gpu": 90 * 2**30,
        "peak_phase": "backward",
        "fits": False,
        "model": {
            "family": "sdxl",
            "config": "sdxl",
            "pixels": [3, 1024, 768],
            "lora_rank": 0,
            "gradient_checkpointing": True,
        },
        "reference_mode": "copy",
    }
    refused = {"refused": "vipo plan: context parallelism is traced under parallel.strategy=fsdp only"}
    baseline = {"peak_bytes_per_gpu": 120 * 2**30, "peak_phase": "reference", "fits": False}
    rows = {"recipe_strategy": "fsdp", "ddp": entry | {"flops_per_pair": 30}, "fsdp": refused, "zero2": entry}
    rows["baseline"] = baseline | {"flops_per_pair": 20}  # zero3: not traced yet
    notes = {}
    row = table.render_row("r", rows, notes)
    assert "| 90.0 GiB (backward), **does not fit** |" in row
    assert "768x1024" in row and "2 pairs/GPU" in row and "copy reference" in row
    context = table._step(entry | {"context_ranks": 4, "pairs_per_gpu": 1})
    assert "1 pair/4 GPUs (context parallel)" in context
    assert "| not traced [^1] |" in row and "| - [^2] |" in row
    assert notes == {refused["refused"]: 1, table.NOT_YET: 2}
    assert "| 0.75, 1.50 |" in row  # 90 / 120 GiB, 30 / 20 FLOPs
    data = {"gpus": 8, "gpu_memory_bytes": 80 * 2**30, "machine": "m", "versions": {"torch": "t"}}
    data |= {"recipes": ["r"], "rows": {"r": rows}}
    rendered = table.render_table(data)
    assert f"[^1]: {refused['refused']}\n[^2]: {table.NOT_YET}" in rendered and "80 GiB" in rendered


def test_the_readme_block_is_rewritten_between_its_markers(tmp_path, committed):
    start, end = table.STRATEGY_MARKERS
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{start}\nold table\n{end}\nafter\n")
    assert table.write_readme(committed, readme)
    text = readme.read_text()
    assert text.startswith("before\n") and text.endswith(f"{end}\nafter\n")
    assert table.readme_table(text) == table.render_table(committed)
    assert not table.write_readme(committed, readme)  # already up to date
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="strategy-table:start"):
        table.write_readme(committed, readme)


def test_retracing_some_recipes_keeps_every_row_already_traced(tmp_path):
    results = tmp_path / "table.json"
    done = {cell: {"refused": "stand-in"} for cell in table.CELLS}
    rows = {name: {"recipe_strategy": "ddp", **done} for name in ("vipo-sd15-poly", "tiny-sd15-poly")}
    results.write_text(json.dumps({"rows": rows}))
    data = table.trace_all(("vipo-sd15-poly",), results=results)  # every cell there: nothing traced
    assert data["recipes"] == ["tiny-sd15-poly", "vipo-sd15-poly"]  # RECIPES' order, both rows
    assert json.loads(results.read_text())["rows"] == rows
