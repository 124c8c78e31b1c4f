"""`kdaudit teacher` and `kdaudit student`: train one model outside a run, and the DP-SGD
flags every command that runs DP-SGD shares (`kdaudit run` too)."""
from __future__ import annotations

import argparse
from pathlib import Path

from kdaudit.config import load_config, presets
from kdaudit.store import FolderLock


def _student(args: argparse.Namespace) -> int:
    import dataclasses

    from kdaudit.distil import StudentJob, train_student

    cfg = load_config(args.preset, args.config)
    flags = {k: v for k, v in (("epochs", args.epochs), ("lr", args.lr),
                               ("batch_size", args.batch_size)) if v}
    # DP-SGD runs take [dp_train] (and the flags); the other students [student]
    job = StudentJob(
        args.method, student_base=args.student_base, data=args.data, out=args.out,
        teacher=args.teacher, validation=args.validation, tokenizer=args.tokenizer,
        train=dataclasses.replace(cfg.student_train(args.method), **flags), kd=cfg.kd,
        max_length=args.max_length or cfg.data.max_length, seed=args.seed,
        mapping=args.mapping, mixed_precision=cfg.mixed_precision, epsilon=args.epsilon,
        teacher_base=args.teacher_base, delta=args.delta,
        **{**cfg.dp.dp_sgd_options(), **_dp_sgd_flags(args)},
        dp_train=dataclasses.replace(cfg.dp_train, **flags),
        synthetic_records=cfg.dp.synthetic_records, synthetic_tokens=cfg.dp.synthetic_tokens,
        no_repeat_ngram=cfg.dp.no_repeat_ngram,
        categories=None if args.categories is None else
        [c.strip() for c in args.categories.split(",") if c.strip()])
    with FolderLock(args.out):
        result = train_student(job)
    _print_trained(args.method, result, args.out)
    if result.privacy:
        p = result.privacy
        print(f"privacy spent: epsilon {p['epsilon']:.4f} at delta {p['delta']:.3g} "
              f"({p['composition']}); details in {Path(args.out) / 'privacy.json'}")
        for part in p["components"].values():
            _print_dp_run(part)
    return 0



def _print_trained(what: str, result, out) -> None:
    """Steps and time; the loss only for non-DP runs (a DP run's is on private batches
    without noise: it stays in the private log)."""
    if result.private_log:
        print(f"{what}: {result.steps} steps in {result.seconds:.0f} s; saved to {out} (the "
              f"training log, losses on private batches, is in {result.private_log}: "
              f"keep it private)")
    else:
        print(f"{what}: {result.steps} steps in {result.seconds:.0f} s, loss "
              f"{result.first_loss:.3f} → {result.last_loss:.3f}; saved to {out}")



def _print_dp_run(p: dict) -> None:
    """What one DP-SGD run protects, how secret its noise is, and what its audit found."""
    if "unit" not in p:
        return
    unit = p["unit"]
    print(f"  privacy unit: one {unit} ({p['units']} {unit}s, {p['records']} records, the "
          f"largest {unit} has {p['largest_unit']})")
    if "group_privacy" in p:
        g = p["group_privacy"]
        print(f"  a person with {g['records']} records has epsilon {g['epsilon']:.3f} at the "
              f"same delta (record-level DP protects records, not persons)")
    if p["noise"] == "reproducible":
        print("  noise: REPRODUCIBLE from the seed; the guarantee does not hold against "
              "anyone who knows the seed")
    if "white_box_audit" in p:
        a = p["white_box_audit"]
        print(f"  white-box one-run audit: epsilon >= {a['epsilon_lower_bound']:.3f} (95%), "
              f"{a['correct']} of {a['guesses']} guesses on {a['canaries']} gradient canaries")



def _dp_sgd_flags(args: argparse.Namespace) -> dict:
    """The DP-SGD options given on the command line (the rest from the preset)."""
    return {k: v for k, v in (("max_grad_norm", args.max_grad_norm), ("unit", args.dp_unit),
                              ("reproducible_noise", args.reproducible_noise or None)) if v}



def _teacher(args: argparse.Namespace) -> int:
    import dataclasses

    from kdaudit.distil import TeacherJob, train_teacher

    cfg = load_config(args.preset, args.config)
    train = dataclasses.replace(cfg.teacher, **{k: v for k, v in (
        ("epochs", args.epochs), ("lr", args.lr), ("batch_size", args.batch_size)) if v})
    job = TeacherJob(
        base=args.base, data=args.data, out=args.out, dp=args.dp, epsilon=args.epsilon,
        delta=args.delta, mechanism=args.mechanism,
        lmo_params=args.lmo_params, tokenizer=args.tokenizer, train=train,
        max_length=args.max_length or cfg.data.max_length, seed=args.seed,
        mapping=args.mapping, **{**cfg.dp.dp_sgd_options(), **_dp_sgd_flags(args)})
    with FolderLock(args.out):
        result = train_teacher(job)
    _print_trained("teacher", result, args.out)
    if result.privacy and result.privacy.get("mechanism") == "lmo":
        from kdaudit.dp.lmo import LMOReport

        p = result.privacy
        inf = lambda x: float("inf") if x is None else x  # noqa: E731  (null: infinite)
        report = LMOReport(inf(p["epsilon_claimed"]), inf(p["epsilon_pld_lower_bound"]),
                           delta=p["delta"])
        print(f"DP-SGD with LMO-DP noise ({p['lmo_params_file']}): sample rate "
              f"{p['sample_rate']:.4g}, {p['steps']} steps, clip {p['max_grad_norm']:g}")
        for line in report.lines()[:2]:
            print(f"  {line}")
        if report.claim_fails:
            print("The LMO-DP privacy claim does not hold: a lower bound on the true epsilon "
                  "is larger than the claimed epsilon.")
    elif result.privacy:
        p = result.privacy
        print(f"DP-SGD: noise multiplier {p['noise_multiplier']:.4f}, sample rate "
              f"{p['sample_rate']:.4g}, {p['steps']} steps, delta {p['delta']:.3g}: epsilon "
              f"{p['epsilon']:.4f} (PRV), {p['epsilon_pld']:.4f} (PLD), "
              f"{p['epsilon_rdp']:.4f} (RDP)")
    if result.privacy:
        _print_dp_run(result.privacy)
    return 0



def _add_training_flags(p: argparse.ArgumentParser) -> None:
    """Where `teacher` and `student` take their hyperparameters from, then the overrides."""
    p.add_argument("--preset", default="tiny", choices=presets())
    p.add_argument("--config", type=Path, help="TOML file overriding preset fields")
    p.add_argument("--epochs", type=float)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-length", type=int, help="tokens per record (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)



def add_dp_sgd_flags(p) -> None:
    """The privacy unit and the secrecy of the noise, for every command that runs DP-SGD."""
    p.add_argument("--dp-unit", choices=["person", "record"],
                   help="what DP-SGD protects (default: the preset's dp.unit, person): a "
                        "person (every record sharing a 'group', or copies of one record, "
                        "sampled and clipped together) or a single record")
    p.add_argument("--reproducible-noise", action="store_true",
                   help="draw the DP noise and sampling from the seed (for tests and "
                        "debugging): the guarantee then does not hold against anyone who "
                        "knows the seed")



def add_teacher_parser(sub) -> None:
    """`kdaudit teacher`: fine-tune a teacher, optionally with DP-SGD."""
    p = sub.add_parser("teacher", help="fine-tune a teacher on private records, optionally "
                                       "with DP-SGD",
                       description="Fine-tune BASE on DATA (the private records) and save it to "
                                   "OUT. With --dp the fine-tuning is DP-SGD (Opacus, Poisson "
                                   "sampling, noise solved from --epsilon) and OUT/privacy.json "
                                   "records the ε spent.")
    p.add_argument("--base", required=True, metavar="PATH",
                   help="the teacher's starting point: a model folder or hub name")
    p.add_argument("--data", required=True, help="training records (.jsonl/.csv/.parquet, "
                   "HF dataset folder or hub name)")
    p.add_argument("--dp", action="store_true", help="train with DP-SGD")
    p.add_argument("--epsilon", type=float, help="DP target ε (default 8; Gaussian only)")
    p.add_argument("--delta", type=float, help="DP δ (default 1/(10·N))")
    p.add_argument("--max-grad-norm", type=float,
                   help="per-unit clipping norm C (default: the preset's dp.max_grad_norm)")
    add_dp_sgd_flags(p)
    p.add_argument("--mechanism", choices=["gaussian", "lmo"], default="gaussian",
                   help="DP-SGD noise: gaussian (σ solved from --epsilon; default) or lmo "
                        "(LMO-DP noise from --lmo-params; privacy.json then holds the ε the "
                        "method claims, not a guarantee, beside a lower bound on the true ε)")
    p.add_argument("--lmo-params", type=Path, metavar="FILE",
                   help="with --mechanism lmo: the LMO-DP parameter file (TOML or JSON); its "
                        "clip must equal --max-grad-norm")
    p.add_argument("--tokenizer", metavar="PATH", help="default: the base's")
    p.add_argument("--mapping", choices=["dolly", "alpaca", "kdaudit"])
    _add_training_flags(p)
    p.add_argument("--out", required=True, help="folder for the trained teacher")
    p.set_defaults(fn=_teacher)



def add_student_parser(sub) -> None:
    """`kdaudit student`: distil one student with one method."""
    from kdaudit.distil import student_methods

    p = sub.add_parser("student", help="distil one student from a teacher with one KD method",
                       description="Train STUDENT_BASE on DATA (public records) with a KD "
                                   "method and save it to OUT. Hyperparameters come from the "
                                   "preset's [student] and [kd] sections, a --config file, "
                                   "then the flags.")
    p.add_argument("--method", required=True, choices=student_methods())
    p.add_argument("--student-base", required=True, metavar="PATH",
                   help="the student's starting point: a model folder or hub name (for "
                        "minillm, a student already fine-tuned on the data, e.g. a nokd one)")
    p.add_argument("--teacher", metavar="PATH", help="the teacher (every method but nokd)")
    p.add_argument("--data", required=True, help="training records (.jsonl/.csv/.parquet, "
                   "HF dataset folder or hub name)")
    p.add_argument("--validation", help="validation records for DistiLLM's schedule "
                   "(default: 10%% of --data, at most 100)")
    dp = p.add_argument_group(
        "DP methods", "distildp, synthetic_only, dpsgd_student and dpkd train from the private "
        "records (--data) at a total budget --epsilon; distildp/synthetic_only/dpkd train "
        "their DP teacher from --teacher-base (into OUT-teacher) or reuse --teacher")
    dp.add_argument("--epsilon", type=float, help="total ε of the student (inf: no noise)")
    dp.add_argument("--delta", type=float, help="total δ (default 1/(10·N))")
    dp.add_argument("--max-grad-norm", type=float, help="per-unit clipping norm C "
                    "(default: the preset's dp.max_grad_norm)")
    add_dp_sgd_flags(dp)
    dp.add_argument("--teacher-base", metavar="PATH",
                    help="the DP teacher's starting point (e.g. a pretrained base)")
    dp.add_argument("--categories", metavar="A,B,...",
                    help="public category names the synthetic records are spread over "
                         "(default: Dolly's eight); never read from the private data")
    p.add_argument("--tokenizer", metavar="PATH", help="default: the student base's")
    p.add_argument("--mapping", choices=["dolly", "alpaca", "kdaudit"],
                   help="column schema of the data files (guessed when omitted)")
    _add_training_flags(p)
    p.add_argument("--out", required=True, help="folder for the trained student")
    p.set_defaults(fn=_student)
