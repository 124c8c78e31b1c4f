"""`kdaudit privacy`: privacy numbers from the command line, through kdaudit.dp only.

Three modes: ε of a DP-SGD run (PRV, PLD, RDP and the PRV/PLD gap), the noise multiplier
for a target ε, or the three labelled LMO-DP numbers of a parameter file.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_privacy_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `privacy` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "privacy", help="DP accounting: epsilon of a DP-SGD run, the noise multiplier for a "
                        "target epsilon, or an audit of an LMO-DP parameter set",
        description="Either --noise-multiplier S --sample-rate Q --steps T (--delta D | "
                    "--n-records N): epsilon by PRV (reported), PLD (cross-check) and RDP "
                    "(reference). Or --epsilon E --sample-rate Q --steps T --delta D: the "
                    "noise multiplier that spends E. Or --lmo-params FILE: the epsilon "
                    "LMO-DP claims next to a lower bound on its true epsilon.")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--noise-multiplier", type=float, metavar="S",
                      help="Gaussian noise standard deviation / clipping norm")
    mode.add_argument("--epsilon", type=float, metavar="E", help="target epsilon to solve for")
    mode.add_argument("--lmo-params", type=Path, metavar="FILE",
                      help="LMO-DP parameter file (TOML or JSON), e.g. kdaudit/dp/"
                           "lmo_reference.toml")
    p.add_argument("--sample-rate", type=float, metavar="Q",
                   help="Poisson sampling rate (expected batch size / N)")
    p.add_argument("--steps", type=int, metavar="T", help="number of noisy steps")
    d = p.add_mutually_exclusive_group()
    d.add_argument("--delta", type=float, metavar="D", help="target delta")
    d.add_argument("--n-records", "--n-units", type=int, metavar="N",
                   help="number of privacy units (persons; records for record-level DP-SGD); "
                        "delta = 1/(10 N)")
    p.add_argument("--group-size", type=int, metavar="K",
                   help="with --noise-multiplier: also the epsilon of a person with K records "
                        "when the run protects single records (record-level DP-SGD)")
    p.add_argument("--empirical", type=float, metavar="EPS",
                   help="with --lmo-params: an empirical lower bound on epsilon from a "
                        "privacy audit, shown and compared with the claim")
    p.set_defaults(fn=run_privacy)
    return p


def _run_args(args: argparse.Namespace) -> tuple[float, int, float]:
    from kdaudit.dp.accounting import default_delta

    missing = [flag for flag, v in (("--sample-rate", args.sample_rate),
                                    ("--steps", args.steps)) if v is None]
    if args.delta is None and args.n_records is None:
        missing.append("--delta (or --n-records)")
    if missing:
        raise ValueError(f"kdaudit privacy: missing {', '.join(missing)}")
    delta = args.delta if args.delta is not None else default_delta(args.n_records)
    return args.sample_rate, args.steps, delta


def run_privacy(args: argparse.Namespace) -> int:
    """Print the numbers of the chosen mode; returns the exit status."""
    from kdaudit.dp import accounting, lmo

    if args.lmo_params is not None:
        given = [f for f, v in (("--sample-rate", args.sample_rate), ("--steps", args.steps),
                                ("--delta", args.delta), ("--n-records", args.n_records))
                 if v is not None]
        if given:
            raise ValueError(f"--lmo-params: the file sets sample_rate, steps and delta; "
                             f"drop {', '.join(given)}")
        params = lmo.load_lmo_params(args.lmo_params)
        report = lmo.lmo_report(params, empirical=args.empirical)
        print(f"LMO-DP parameters {args.lmo_params}: sample rate {params.sample_rate:g}, "
              f"{params.steps} steps, clip {params.clip:g}")
        for line in report.lines():
            print(f"  {line}")
        if report.claim_fails:
            print("The LMO-DP privacy claim does not hold: a lower bound on the true epsilon "
                  "is larger than the claimed epsilon.")
        strict = lmo.claimed_epsilon(params, strict=True)
        print(f"Note: the claim evaluates moment generating functions where they are "
              f"infinite. The authors' procedure restricted to the orders where they are "
              f"finite gives {strict:.4f}: not a guarantee and not a corrected epsilon (the "
              f"true epsilon is at least the lower bound above).")
        return 0
    if args.empirical is not None:
        raise ValueError("--empirical goes with --lmo-params")
    if args.group_size is not None and (args.noise_multiplier is None or args.group_size < 1):
        raise ValueError("--group-size K (an integer >= 1) goes with --noise-multiplier")

    q, steps, delta = _run_args(args)
    if args.noise_multiplier is not None:
        spent = accounting.account(args.noise_multiplier, q, steps, delta)
        print(f"DP-SGD: noise multiplier {spent.noise_multiplier:g}, sample rate {q:g}, "
              f"{steps} steps, delta {delta:g}")
        print(f"  epsilon (PRV, reported):    {spent.epsilon:.4f}")
        print(f"  epsilon (PLD, cross-check): {spent.epsilon_pld:.4f}")
        print(f"  epsilon (RDP, reference):   {spent.epsilon_rdp:.4f}")
        print(f"  PRV/PLD relative gap: {100 * spent.relative_gap():.2f}%")
        if args.group_size:
            group = accounting.group_epsilon(args.noise_multiplier, q, steps, delta,
                                             args.group_size)
            print(f"  a person with {args.group_size} records, under record-level DP-SGD: "
                  f"epsilon {group:.4f} (PLD, same delta)")
        return 0
    sigma = accounting.solve_noise_multiplier(args.epsilon, q, steps, delta)
    achieved = accounting.epsilon(sigma, q, steps, delta, accountant="prv")
    print(f"Noise multiplier for epsilon {args.epsilon:g} (sample rate {q:g}, {steps} steps, "
          f"delta {delta:g}): {sigma:.4f}")
    print(f"  achieved epsilon (PRV): {achieved:.4f}")
    return 0
