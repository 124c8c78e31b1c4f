"""Differential privacy for kdaudit (docs/methods.md §5–§7).

`accounting` is the single source of the privacy numbers (ε by PRV, PLD and RDP; δ default;
noise multiplier from a target ε); `lmo` samples LMO-DP noise and audits its claimed ε;
`dpsgd` wires Opacus into the one training loop (Gaussian or LMO-DP noise); `synthetic` is
DistilDP's data side and `students` the recipes of the four DP students.
"""
from kdaudit.dp.accounting import (
    ACCOUNTANTS,
    PrivacySpent,
    account,
    default_delta,
    epsilon,
    solve_noise_multiplier,
)
from kdaudit.dp.lmo import (
    LMOParams,
    LMOReport,
    claimed_epsilon,
    lmo_report,
    load_lmo_params,
    pld_lower_bound,
    sample_noise,
)

__all__ = [
    "ACCOUNTANTS", "PrivacySpent", "account", "default_delta", "epsilon",
    "solve_noise_multiplier", "LMOParams", "LMOReport", "claimed_epsilon", "lmo_report",
    "load_lmo_params", "pld_lower_bound", "sample_noise",
]
