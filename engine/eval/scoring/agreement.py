"""Do reward models agree with a data set's labels, and with each other? And what alpha follows.

For every pair each scorer gives the winner and the loser a score. Reported (the paper's
Section 5.2 figure: only 20.79% of Pick-a-Pic v2 pairs are ranked the same way by PickScore,
ImageReward, HPSv2, Aesthetic and CLIP score):

    label_accuracy[s]   share of pairs where scorer s ranks the labelled winner higher (ties 1/2)
    all_agree_label     share of pairs where every scorer ranks the winner strictly higher
    all_agree_each      share of pairs where every scorer ranks the same image strictly higher
                        (whichever it is): the paper's 20.79%
    easy                share of pairs where every scorer prefers the winner by more than
                        `easy_margin` standard deviations of its scores: trivially separable pairs

The alpha regime (paper Section 5.2 and Fig. 7) is read from these with the rule in `RULE`.
The distribution of p = sigmoid(z) under the reference model carries no information here: before
training the policy is the reference, so z = 0 and p = 1/2 for every pair. The rule uses the
reward models' margins instead, which is what p would move towards if the policy learned what
the reward models see.
"""

from dataclasses import asdict, dataclass, field

import torch

NOISY_ACCURACY = 0.65
NOISY_CONSENSUS = 0.5
SIMPLE_ACCURACY = 0.9
SIMPLE_EASY = 0.5

RULE = (
    f"noisy (alpha > 0) if the mean per-scorer label accuracy < {NOISY_ACCURACY} or fewer than "
    f"{NOISY_CONSENSUS:.0%} of pairs have all scorers agreeing with each other; over-simple (alpha < 0) "
    f"if the mean label accuracy >= {SIMPLE_ACCURACY} and at least {SIMPLE_EASY:.0%} of pairs are easy "
    "(every scorer prefers the winner by more than `easy_margin` standard deviations of its scores); "
    "clean (alpha = 0) otherwise. p under the reference model is 1/2 for every pair before training "
    "(policy == reference), so the rule reads the reward models' margins instead of p. The thresholds "
    "are heuristics placed around the paper's cases (20.79% consensus on Pick-a-Pic v2 -> alpha 8; "
    "winners against shuffled losers -> alpha < 0; curated ViPO data -> alpha ~0), not fitted values."
)


@dataclass
class Agreement:
    pairs: int
    scorers: list[str]
    label_accuracy: dict[str, float]
    all_agree_label: float
    all_agree_each: float
    easy: float
    easy_margin: float
    margin_quantiles: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def agreement(
    winner_scores: dict[str, torch.Tensor],
    loser_scores: dict[str, torch.Tensor],
    *,
    easy_margin: float = 1.0,
    skipped: int = 0,
) -> Agreement:
    """Agreement figures of [P] winner and loser scores per scorer."""
    names = list(winner_scores)
    if not names:
        raise ValueError("agreement needs at least one scorer")
    margins = torch.stack([(winner_scores[n].double() - loser_scores[n].double()) for n in names])  # [S, P]
    pairs = margins.shape[1]
    if pairs == 0:
        raise ValueError("agreement needs at least one pair")
    # One spread per scorer over all its scores: margins of different scorers become comparable.
    spread = torch.stack(
        [torch.cat([winner_scores[n], loser_scores[n]]).double().std(unbiased=False) for n in names]
    )
    standardized = margins / spread.clamp_min(1e-12).unsqueeze(1)
    quantiles = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    return Agreement(
        pairs=pairs,
        scorers=names,
        label_accuracy={
            n: ((m > 0).double() + 0.5 * (m == 0).double()).mean().item()
            for n, m in zip(names, margins, strict=True)
        },
        all_agree_label=(margins > 0).all(0).double().mean().item(),
        all_agree_each=((margins > 0).all(0) | (margins < 0).all(0)).double().mean().item(),
        easy=(standardized > easy_margin).all(0).double().mean().item(),
        easy_margin=easy_margin,
        margin_quantiles={
            n: dict(zip(("q10", "q50", "q90"), torch.quantile(s, quantiles).tolist(), strict=True))
            for n, s in zip(names, standardized, strict=True)
        },
        skipped=skipped,
    )


def suggest_alpha(stats: Agreement) -> dict:
    """The alpha regime for `stats` by RULE, with the figures it read."""
    accuracy = sum(stats.label_accuracy.values()) / len(stats.label_accuracy)
    if accuracy < NOISY_ACCURACY or stats.all_agree_each < NOISY_CONSENSUS:
        regime, alpha = "noisy", "alpha > 0 (the paper uses 8 on Pick-a-Pic v2)"
    elif accuracy >= SIMPLE_ACCURACY and stats.easy >= SIMPLE_EASY:
        # Eq. 10: dL/dz = -(1-p)(1+alpha p) changes sign at p = -1/alpha when alpha < -1.
        regime, alpha = (
            "over-simple",
            "alpha in [-1, 0), e.g. -0.5 (below -1 the gradient flips sign for p > -1/alpha)",
        )
    else:
        regime, alpha = "clean", "alpha = 0 (Poly-DPO is Diffusion-DPO)"
    single = len(stats.scorers) == 1
    return {
        "regime": regime,
        "alpha": alpha,
        "mean_label_accuracy": accuracy,
        "all_agree_each": stats.all_agree_each,
        "easy": stats.easy,
        "rule": RULE,
        **({"caution": "one scorer: consensus between reward models cannot be measured"} if single else {}),
    }


def format_report(stats: Agreement, suggestion: dict | None = None) -> str:
    lines = [f"pairs scored: {stats.pairs}" + (f" ({stats.skipped} skipped)" if stats.skipped else "")]
    width = max(len(n) for n in stats.scorers)
    for name in stats.scorers:
        q = stats.margin_quantiles[name]
        lines.append(
            f"  {name:{width}s}  label accuracy {stats.label_accuracy[name]:.3f}   standardized margin "
            f"q10 {q['q10']:+.2f} q50 {q['q50']:+.2f} q90 {q['q90']:+.2f}"
        )
    lines += [
        f"all scorers agree with the label:  {stats.all_agree_label:.2%}",
        f"all scorers agree with each other: {stats.all_agree_each:.2%}   (Pick-a-Pic v2, 5 scorers: 20.79%)",
        f"easy pairs (every margin > {stats.easy_margin:g} sd):  {stats.easy:.2%}",
    ]
    if suggestion:
        lines += [f"suggested: {suggestion['regime']} -> {suggestion['alpha']}"]
        if "caution" in suggestion:
            lines.append(f"caution: {suggestion['caution']}")
        lines.append(f"rule: {suggestion['rule']}")
    return "\n".join(lines)
