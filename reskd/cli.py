"""The `reskd` command. Each subcommand imports its heavy dependencies only when run, so the serving install
(no torch) can use the others."""

from __future__ import annotations

import argparse
import sys
import tomllib


def _parse_set(items: list[str]) -> dict:
    """--set a.b=VALUE, VALUE read as a TOML value (numbers, booleans, quoted strings, arrays), else a string."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"reskd: --set wants KEY=VALUE (e.g. teacher.epochs=2), got {item!r}")
        try:
            out[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = raw
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from reskd.training.data import DatasetError
    from reskd.training.pipeline import RunDirError, train
    from reskd.training.recipe import RecipeError, load_recipe

    try:
        recipe = load_recipe(args.recipe, _parse_set(args.set))
        report = train(recipe, args.out, resume=args.resume, device=args.device)
    except (RecipeError, DatasetError, RunDirError, FileNotFoundError) as err:
        print(f"reskd train: {err}", file=sys.stderr)
        return 2
    a = report["adaptive"]["test"]
    print(f"teacher {report['models']['teacher']['test_accuracy']:.2f}%  student "
          f"{report['models']['student']['test_accuracy']:.2f}%  adaptive {a['accuracy']:.2f}% at "
          f"{a['pct_teacher_flops']:.2f}% of teacher FLOPs -> {args.out}/report.md")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from reskd.training.data import DatasetError
    from reskd.training.pipeline import RunDirError
    from reskd.training.recipe import RecipeError
    from reskd.training.sweep import run_sweep

    try:
        run_sweep(args.sweep, args.out, tiny=args.tiny, device=args.device)
    except (RecipeError, DatasetError, RunDirError, FileNotFoundError) as err:
        print(f"reskd sweep: {err}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reskd", description="Train ResKD cascades and serve them with early exit.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train teacher, student, res-students and baselines; write a report",
                       description="Run a recipe end to end: teacher, student (KD), res-students, KD baselines, "
                                   "evaluation and report (RUN_DIR/report.md, report.json, pareto.png).")
    p.add_argument("--recipe", required=True, help="a recipe TOML file, or the name of a bundled recipe "
                                                   "(fashion-mnist, fashion-mnist-cpu, cifar10, cifar100, tiny-imagenet)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory (checkpoints, logits, report)")
    p.add_argument("--resume", action="store_true", help="load finished stages from RUN_DIR instead of training")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda when present")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set teacher.epochs=2 (repeatable)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sweep", help="train a grid of recipe variants, sharing identical stages; pick on validation",
                       description="Run every variant of a sweep file (base recipe x axes of overrides), reusing "
                                   "any stage an earlier variant trained identically; write OUT/sweep.md and "
                                   "sweep.json. Rerunning resumes.")
    p.add_argument("--sweep", required=True, metavar="FILE", help="sweep TOML, e.g. training/sweeps/fashion-mnist-gpu.toml")
    p.add_argument("--out", required=True, metavar="DIR", help="one run directory per variant is made under it")
    p.add_argument("--tiny", action="store_true", help="apply the file's [tiny] overrides: a CPU smoke run of the grid")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.set_defaults(func=cmd_sweep)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
