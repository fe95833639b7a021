"""`vipo train RECIPE --dry-run`: everything a run checks before its first step, in seconds.

    config   resolved and validated (load_recipe did it; the key settings are printed)
    data     opened: its pairs counted, a sample of them decoded, skips counted by reason
    model    built on the meta device (no weights, no memory; a weights folder builds its family's
             full architecture, as `vipo plan` does): parameters, trainable share
    memory   the plan's cheap part (budget.py): weights, gradients, optimizer state
             per GPU; activations are `vipo plan`'s, which traces the step

Nothing is trained and nothing is written.
"""

import dataclasses
import time

import torch

from ..errors import RunError
from .budget import GIB, bytes_to_come

SAMPLE_PAIRS = 16


def _data(cfg) -> dict:
    """Pairs of the data (or the latent cache) and the skips met decoding a spread-out sample."""
    if cfg.data.cache:
        from ..data.cache import open_cache

        return {"source": f"latent cache {cfg.data.cache}", "pairs": len(open_cache(cfg))}
    from vipo.loaders.images import BadSample

    from ..data import build_source

    source = build_source(cfg.data, cfg.model, cfg.train.seed)
    inner = getattr(source, "source", source)  # SkipBadSamples would replace a bad pair: read past it
    report = {"source": cfg.data.source, "path": cfg.data.path, "decoded": 0, "bad": []}
    if not hasattr(inner, "__len__"):  # tar shards stream: the first pairs
        report["pairs"] = None
        for record in inner:
            report["decoded"] += record is not None
            if report["decoded"] >= SAMPLE_PAIRS:
                break
        return report
    report["pairs"] = len(inner)
    count = min(SAMPLE_PAIRS, len(inner))
    for k in range(count):
        index = k * len(inner) // count
        try:
            inner[index]
            report["decoded"] += 1
        except BadSample as bad:
            report["bad"].append(f"{bad.ref}: {bad.reason}")
    return report


def _model(cfg) -> dict:
    from ..families import sized_architecture
    from ..models import build_adapter

    model_cfg = dataclasses.replace(
        cfg.model,
        path=None,
        init_from=None,  # the weights are not read; their shapes are the config's
        config=sized_architecture(cfg.model),
    )
    meta = torch.device("meta")
    with torch.device(meta):
        adapter = build_adapter(model_cfg, meta, seed=cfg.train.seed, trainable=True)
    params = list(adapter.network.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    parts = bytes_to_come(params, cfg.parallel.strategy, cfg.optim.optimizer)
    return {
        "family": cfg.model.family,
        "architecture": model_cfg.config,
        "parameters": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "weights_bytes": weights,
        "to_come_bytes": parts,
    }


def dry_run(cfg) -> dict:
    started = time.perf_counter()
    report = {"data": _data(cfg), "model": _model(cfg)}
    report["seconds"] = time.perf_counter() - started
    if report["data"].get("pairs") == 0:
        raise RunError(f"data ({cfg.data.source} {cfg.data.path}): no pairs")
    return report


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def render(cfg, report: dict) -> str:
    data, model = report["data"], report["model"]
    loss = cfg.loss
    lines = [
        f"config: {cfg.model.family} {model['architecture']}, {loss.objective} {loss.loss_type} "
        f"(beta {loss.beta:g}, alpha {loss.alpha:g}), reference {cfg.reference.mode}, "
        f"{cfg.parallel.strategy}, {cfg.train.batch_pairs} pairs x {cfg.train.grad_accum_steps} accumulation, "
        f"{cfg.train.max_steps} steps, {cfg.optim.optimizer} {cfg.optim.schedule}",
    ]
    where = data["source"] + (f" {data['path']}" if data.get("path") else "")
    if "decoded" not in data:
        lines.append(f"data: {where}: {data['pairs']} pairs")
    else:
        pairs = "streamed" if data["pairs"] is None else f"{data['pairs']} pairs"
        bad = f", {len(data['bad'])} bad (first: {data['bad'][0]})" if data["bad"] else ""
        lines.append(
            f"data: {where}: {pairs}; a sample of {data['decoded'] + len(data['bad'])}: decoded {data['decoded']}{bad}"
        )
    share = model["trainable"] / model["parameters"] if model["parameters"] else 0.0
    lines.append(
        f"model: {_count(model['parameters'])} parameters ({share:.1%} trainable), policy weights "
        f"{model['weights_bytes'] / GIB:.2f} GiB (built on the meta device: nothing was read)"
    )
    parts = model["to_come_bytes"]
    if parts is None:
        lines.append(
            f"memory: {cfg.parallel.strategy} shards gradients and optimizer state: `vipo plan` sizes a rank"
        )
    else:
        shown = ", ".join(f"{name} {value / GIB:.2f}" for name, value in parts.items())
        total = (model["weights_bytes"] + sum(parts.values())) / GIB
        lines.append(
            f"policy memory per GPU before activations: {total:.2f} GiB (weights + {shown}); "
            "encoders, reference and activations: `vipo plan RECIPE`"
        )
    lines.append(f"dry run: {report['seconds']:.1f} s, nothing trained or written")
    return "\n".join(lines)
