"""The `reskd` command. Each subcommand imports its heavy dependencies only when run, so the serving install
(no torch) can use the others."""

from __future__ import annotations

import argparse
import sys
import tomllib

# Where a command runs (training, serving, scoring): auto picks CUDA when present (reskd.device, ServeSettings).
DEVICES = ("auto", "cpu", "cuda")


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


def _distributed(command: str, args: argparse.Namespace, work) -> int:
    """Run work(world, device) as this process's rank (torchrun's environment; one process otherwise), with the
    errors every training command reports: a bad recipe, data or run directory, or ranks that cannot train
    together, exit 2; a process group that failed under the run (another rank died or stopped answering) exits 1.
    Each rank reports its own error, prefixed with its rank in a distributed run."""
    from reskd.training.data import DatasetError
    from reskd.training.distributed import DistributedError, World
    from reskd.training.pipeline import pick_device
    from reskd.training.recipe import RecipeError
    from reskd.training.rundir import RunDirError

    where = f"reskd {command}"
    try:
        world = World.from_env()
        if world.distributed:
            where += f" (rank {world.rank} of {world.size})"
        device = world.start(pick_device(args.device), args.dist_timeout)
    except (DistributedError, RuntimeError, ValueError) as err:
        print(f"{where}: {err}", file=sys.stderr)
        return 2
    finished = False
    try:
        code = work(world, device)
        finished = True
        return code
    except (RecipeError, DatasetError, RunDirError, FileNotFoundError, DistributedError) as err:
        print(f"{where}: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # gloo's and NCCL's errors are RuntimeErrors (torch.distributed.DistError or not)
        if not (world.distributed and _in_process_group(err)):
            raise
        print(f"{where}: the process group failed: another rank died or did not answer within --dist-timeout "
              f"{args.dist_timeout:g} s ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})",
              file=sys.stderr)
        return 1
    finally:
        world.stop(together=finished)


def _in_process_group(err: BaseException) -> bool:
    """Whether an error was raised inside torch.distributed (a collective whose peers failed)."""
    import traceback

    return any("/torch/distributed/" in frame.filename.replace("\\", "/")
               for frame in traceback.extract_tb(err.__traceback__))


def cmd_train(args: argparse.Namespace) -> int:
    from reskd.training.pipeline import train
    from reskd.training.recipe import load_recipe

    def work(world, device) -> int:
        recipe = load_recipe(args.recipe, _parse_set(args.set), tiny=args.tiny)
        report = train(recipe, args.out, resume=args.resume, device=device, world=world)
        if report is None:  # another rank than 0: rank 0 reports
            return 0
        a = report["adaptive"]["test"]
        print(f"teacher {report['models']['teacher']['test_accuracy']:.2f}%  student "
              f"{report['models']['student']['test_accuracy']:.2f}%  adaptive {a['accuracy']:.2f}% at "
              f"{a['pct_teacher_flops']:.2f}% of teacher FLOPs -> {args.out}/report.md")
        return 0

    return _distributed("train", args, work)


def cmd_sweep(args: argparse.Namespace) -> int:
    from reskd.training.sweep import run_sweep

    def work(world, device) -> int:
        run_sweep(args.sweep, args.out, tiny=args.tiny, device=device,
                  only=args.only.split(",") if args.only else None, world=world)
        return 0

    return _distributed("sweep", args, work)


def cmd_device_train(args: argparse.Namespace) -> int:
    import json

    from reskd.training.data import DatasetError
    from reskd.training.device_train import STEPS, Plan, device_train
    from reskd.training.recipe import RecipeError
    from reskd.training.rundir import RunDirError

    steps = tuple(s for s in args.steps.split(",") if s)
    unknown = set(steps) - set(STEPS)
    if unknown:
        print(f"reskd device-train: unknown step(s) {', '.join(sorted(unknown))}; the steps are "
              f"{', '.join(STEPS)}", file=sys.stderr)
        return 2
    try:
        progress = device_train(Plan.load(args.plan), args.out, tiny=args.tiny, device=args.device,
                                data_root=args.data_root, pack=args.pack, pack_every_s=args.pack_every,
                                steps=steps,
                                log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except (RecipeError, DatasetError, RunDirError, FileNotFoundError) as err:
        print(f"reskd device-train: {err}", file=sys.stderr)
        return 2
    print(json.dumps(progress, indent=1))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from reskd.export.command import export_run
    from reskd.export.errors import ExportError
    from reskd.manifest import ManifestError
    from reskd.training.data import DatasetError

    try:
        out = export_run(args.run, args.repo, args.name, args.version, target_drop_pt=args.target_drop,
                         flops_budget_pct=args.flops_budget, model=args.model, precision=args.precision,
                         stages=args.stages.split(",") if args.stages else None, combine=args.combine,
                         fallback=args.fallback, log=lambda msg: print(msg, file=sys.stderr))
    except (ExportError, ManifestError, DatasetError, FileNotFoundError) as err:
        print(f"reskd export: {err}", file=sys.stderr)
        return 2
    if args.model:
        _print_metrics(out["model"], out["model_manifest"])
        return 0
    _print_metrics(out["cascade"], out["cascade_manifest"])
    _print_metrics(out["teacher"], out["teacher_manifest"])
    return 0


def cmd_compose(args: argparse.Namespace) -> int:
    from reskd.export.compose import compose_fallback
    from reskd.export.errors import ExportError
    from reskd.manifest import ManifestError
    from reskd.training.data import DatasetError

    try:
        out, manifest = compose_fallback(args.repo, args.name, cascade=args.cascade, fallback=args.fallback,
                                         keep=args.keep, version=args.version, target_drop_pt=args.target_drop,
                                         flops_budget_pct=args.flops_budget,
                                         log=lambda msg: print(msg, file=sys.stderr))
    except (ExportError, ManifestError, DatasetError, FileNotFoundError) as err:
        print(f"reskd compose: {err}", file=sys.stderr)
        return 2
    _print_metrics(str(out), manifest)
    return 0


def _print_curve(path, manifest) -> None:
    """The operating points as a table, cheapest first."""
    points = manifest.operating_points
    if points is None:
        print(f"{path}: no operating points (calibrated before they were stored; `reskd calibrate` adds them)")
        return
    print(f"{path}: operating points on the {points.split} split ({points.n} images); accuracy difference against "
          "every stage run, with its paired bootstrap 95% interval")
    print(f"{'id':<14} {'max_stage':>9} {'accuracy %':>10} {'diff pt':>8} {'95% interval':>17} {'% teacher':>9} "
          f"{'MFLOPs':>8}  exits per stage  thresholds")
    for p in points.points:
        mark = "  (default)" if p.id == points.default else ""
        lo, hi = p.diff_ci95_pt
        print(f"{p.id:<14} {p.max_stage:>9} {100 * p.accuracy:>10.2f} {p.diff_vs_full_pt:>+8.2f} "
              f"[{lo:+6.2f}, {hi:+6.2f}] {p.pct_teacher_flops:>9.2f} {p.mean_flops / 1e6:>8.2f}  "
              f"{'/'.join(f'{f:.3f}' for f in p.exit_fractions)}  {[round(t, 4) for t in p.thresholds]}{mark}")


def cmd_calibrate(args: argparse.Namespace) -> int:
    from reskd.export.calibrate import calibrate_version, store_references
    from reskd.export.errors import ExportError
    from reskd.export.runs import eval_sets
    from reskd.manifest import ManifestError, ModelRepository, parse_model_ref
    from reskd.training.data import DatasetError

    try:
        name, version = parse_model_ref(args.model)
        path, manifest = ModelRepository(args.repo).load(name, version)
        if args.list:
            _print_curve(path, manifest)
            return 0
        if len(manifest.stages) < 2:
            raise ManifestError(f"{name} has a single stage: there is no exit to calibrate")
        if manifest.source is None:
            raise ManifestError(f"{path}/manifest.json: source.data is missing, so the validation split is unknown")
        if args.references_only and (args.target_drop is not None or args.flops_budget is not None):
            raise ManifestError("--references-only keeps the thresholds: it takes neither --target-drop nor "
                                "--flops-budget")
        val, test = eval_sets(manifest.source.data, manifest.input)
        if args.references_only:
            new = store_references(path, val, args.audit_model)
            _print_references(str(path), new)
            return 0
        previous = manifest.calibration  # its bound and z stay, unless it had none (a FLOPs budget)
        bound = (previous and previous.bound) or "upper"
        z = previous.z if previous and previous.z is not None else 1.0
        target = args.target_drop if args.target_drop is not None or args.flops_budget is not None else 0.1
        new = calibrate_version(path, val, test, target_drop_pt=target, flops_budget_pct=args.flops_budget,
                                bound=bound, z=z, audit_model=args.audit_model)
    except (ExportError, ManifestError, DatasetError, ValueError) as err:
        print(f"reskd calibrate: {err}", file=sys.stderr)
        return 2
    _print_metrics(str(path), new)
    _print_curve(path, new)
    _print_references(str(path), new)
    return 0


def _print_references(path: str, manifest) -> None:
    """The audit and drift references stored for the server's monitoring."""
    a, d = manifest.audit, manifest.drift
    if a is not None:
        ref = a.model or f"stage {a.stage} ({manifest.stages[a.stage].name})"
        default = manifest.operating_points.default if manifest.operating_points else "default"
        shown = ", ".join("-" if v is None else f"{100 * v:.2f}%" for v in a.points.get(default, []))
        print(f"{path}: audit reference {ref}; agreement on {a.split} ({a.n} images) at the default point, per exit "
              f"stage: {shown}")
    else:
        print(f"{path}: no audit reference (no fallback stage, no teacher.model; --audit-model NAME:VERSION names one)")
    if d is not None:
        print(f"{path}: drift reference: stage-{d.stage} {d.score} score p50 {d.quantiles[d.levels.index(0.5)]:.3f}, "
              f"p99 {d.p99:.3f} ({100 * d.above_p99:.2f}% of {d.split} above it)")


def cmd_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from reskd.manifest import ManifestError
    from reskd.service.launch import serve
    from reskd.service.settings import ServeSettings
    from reskd.validation import describe

    overrides = {k: v for k, v in {"repo": args.repo, "host": args.host, "port": args.port,
                                   "grpc_port": args.grpc_port, "device": args.device, "model_control": args.model_control,
                                   "workers": args.workers}.items() if v is not None}
    try:
        settings = ServeSettings(**overrides)
    except ValidationError as err:
        fields = describe(err, where=lambda loc: "RESKD_" + "_".join(loc).upper())
        print(f"reskd serve: invalid setting: {'; '.join(fields)}", file=sys.stderr)
        return 2
    try:
        return serve(settings)
    except (ManifestError, ValueError, RuntimeError) as err:
        print(f"reskd serve: {err}", file=sys.stderr)
        return 2


def cmd_score(args: argparse.Namespace) -> int:
    from reskd.manifest import ManifestError
    from reskd.scoring import ScoreError, ScoreOptions, score

    options = ScoreOptions(repo=args.repo, model=args.model, inputs=args.inputs, out=args.out, engine=args.engine,
                           resume=args.resume, labels=args.labels, batch_size=args.batch_size,
                           shard_size=args.shard_size, device=args.device, workers=args.workers,
                           threads=args.threads, actors=args.actors, gpus_per_actor=args.gpus_per_actor,
                           progress=not args.quiet, audit=args.audit, audit_model=args.audit_model)
    try:
        summary = score(options)
    except (ScoreError, ManifestError) as err:
        print(f"reskd score: {err}", file=sys.stderr)
        return 2
    print("\n".join(summary.lines()))
    return 0


def _print_metrics(path: str, manifest) -> None:
    m = manifest.metrics
    print(f"{path}: thresholds {[round(t, 6) for t in manifest.exit.thresholds]}; test accuracy "
          f"{100 * m.adaptive_accuracy:.2f}% at {m.pct_teacher_flops:.2f}% of teacher FLOPs, exits {m.exit_counts}")


def add_dist_timeout(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dist-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="under torchrun: how long a rank waits for the others at a collective before the job fails "
                        "(a rank that died or hangs); rank 0's evaluation between a sweep's variants must fit in it "
                        "(default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reskd", description="Train ResKD cascades and serve them with early exit.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train teacher, student, res-students and baselines; write a report",
                       description="Run a recipe end to end: teacher, student (KD), res-students, KD baselines, "
                                   "evaluation and report (RUN_DIR/report.md, report.json, pareto.png).")
    p.add_argument("--recipe", required=True,
                   help="a recipe TOML file, or the name of a bundled recipe (fashion-mnist, fashion-mnist-cpu, "
                        "fashion-mnist-reference, cifar10, cifar100, tiny-imagenet)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory (checkpoints, logits, report)")
    p.add_argument("--resume", action="store_true",
                   help="load finished stages from RUN_DIR instead of training, and continue an interrupted stage "
                        "from its last finished epoch")
    p.add_argument("--device", choices=DEVICES, default="auto", help="default: cuda when present")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set teacher.epochs=2 (repeatable)")
    p.add_argument("--tiny", action="store_true",
                   help="apply the recipe's [tiny] overrides (before --set): a smoke run in seconds on a CPU")
    add_dist_timeout(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sweep", help="train a grid of recipe variants, sharing identical stages; pick on validation",
                       description="Run every variant of a sweep file (base recipe x axes of overrides), reusing "
                                   "any stage an earlier variant trained identically; write OUT/sweep.md and "
                                   "sweep.json. Rerunning resumes.")
    p.add_argument("--sweep", required=True, metavar="FILE", help="sweep TOML, e.g. training/sweeps/fashion-mnist-gpu.toml")
    p.add_argument("--out", required=True, metavar="DIR", help="one run directory per variant is made under it")
    p.add_argument("--tiny", action="store_true", help="apply the file's [tiny] overrides: a CPU smoke run of the grid")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--only", metavar="LABEL[,LABEL...]",
                   help="train and evaluate only these variants (e.g. in a second process beside a first); the "
                        "others are read back and summarised where up to date; any stage of theirs already finished "
                        "(e.g. the teacher) is shared, not trained again")
    add_dist_timeout(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("device-train", help="the reference cascade on a GPU host, in resumable named steps",
                       description="Train a plan's teacher candidates (smallest first, until one reaches the "
                                   "target on validation), then the cascade, then the baselines, each step "
                                   "leaving its result in OUT before the next starts; a re-run resumes. "
                                   "See training/device_train.py and docs/device.md.")
    p.add_argument("--plan", default="fashion-mnist-gpu", metavar="PLAN",
                   help="a plan file, or a bundled plan's name (default: %(default)s)")
    p.add_argument("--out", required=True, metavar="DIR", help="one run directory per step's runs is made here")
    p.add_argument("--tiny", action="store_true", help="apply the plan's [tiny] overrides: a CPU rehearsal")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--data-root", metavar="DIR", help="the dataset's files (data.root of every recipe)")
    p.add_argument("--pack", metavar="DIR",
                   help="after every step, OUT as DIR/run.tar.partNNN of at most 15 MiB each; restore with "
                        "`cat DIR/run.tar.part* | tar -x -C DEST`")
    p.add_argument("--pack-every", type=float, default=60.0, metavar="SECONDS",
                   help="inside a step, pack again after an epoch once this long has passed since the last pack, "
                        "so a cut-off call keeps its epochs (default: %(default)s)")
    p.add_argument("--steps", default="teacher,cascade,baselines", help="comma-separated subset, in order")
    p.set_defaults(func=cmd_device_train)

    p = sub.add_parser("export", help="write a run's cascade and teacher to a model repository (ONNX, checked)",
                       description="Export each stage of RUN_DIR to ONNX as REPO/NAME/VERSION (and the teacher as "
                                   "REPO/NAME-teacher/VERSION), check parity with PyTorch on every validation "
                                   "image, calibrate exit thresholds through the runtime, measure the test set. "
                                   "Existing versions are never overwritten.")
    p.add_argument("--run", required=True, metavar="RUN_DIR")
    p.add_argument("--repo", required=True, metavar="REPO")
    p.add_argument("--name", required=True, metavar="NAME")
    p.add_argument("--version", type=int, metavar="N", help="default: one above the highest existing")
    p.add_argument("--model", metavar="CHECKPOINT",
                   help="export only this network of the run (e.g. kd-resnet8, a KD baseline) as a one-stage NAME, "
                        "measured against the run's teacher; no NAME-teacher is written")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32",
                   help="arithmetic inside every stage written, the teacher's too (images and logits stay float32); "
                        "thresholds are calibrated on it (default fp32)")
    p.add_argument("--combine", choices=["sum", "replace"], default="sum",
                   help="sum: a ResKD cascade, the running logits are the sum of the stage outputs (default); "
                        "replace: a confidence cascade of independent models, each stage's logits replace the "
                        "earlier ones")
    p.add_argument("--stages", metavar="A,B,...",
                   help="the run's networks to cascade, in order (default: student and res-students for sum, the "
                        "recipe's baselines.independent_cascade for replace; e.g. student,kd-resnet8,kd-resnet14)")
    p.add_argument("--fallback", metavar="NETWORK",
                   help="append this network of the run (e.g. teacher) as a last stage whose logits replace the "
                        "running logits: what no earlier stage is confident about gets its answer")
    _calibration_args(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("compose", help="a new cascade version from a repository's versions: a cascade's stages "
                                       "and a fallback model after them",
                       description="Write REPO/NAME/VERSION from versions already in REPO, without their run: the "
                                   "first --keep stages of --cascade (stage files copied as they are) and the "
                                   "one-stage --fallback (e.g. the teacher) as a last stage whose logits replace "
                                   "the running logits; thresholds and the operating-point curve calibrated "
                                   "through the runtime on the cascade's validation split, the test set measured. "
                                   "Needs the train extra (the split is rebuilt from the manifest's source.data).")
    p.add_argument("--repo", required=True, metavar="REPO")
    p.add_argument("--name", required=True, metavar="NAME", help="the new version's model name")
    p.add_argument("--version", type=int, metavar="N", help="default: one above the highest existing")
    p.add_argument("--cascade", required=True, metavar="NAME[:VERSION]", help="the cascade whose stages come first")
    p.add_argument("--keep", type=int, metavar="K", help="keep its first K stages (default: all)")
    p.add_argument("--fallback", required=True, metavar="NAME[:VERSION]",
                   help="a one-stage model of the same data (e.g. the cascade's teacher version)")
    _calibration_args(p)
    p.set_defaults(func=cmd_compose)

    p = sub.add_parser("calibrate", help="choose exit thresholds on the validation split, through the runtime",
                       description="Recalibrate a model version's exit thresholds and its operating-point curve "
                                   "on its validation split (from the manifest's source.data) and re-measure the "
                                   "test set; rewrites its manifest. --list prints the stored curve.")
    p.add_argument("--repo", required=True, metavar="REPO")
    p.add_argument("--model", required=True, metavar="NAME[:VERSION]")
    p.add_argument("--list", action="store_true",
                   help="print the version's stored operating points (the accuracy/compute curve) and change nothing")
    p.add_argument("--references-only", action="store_true",
                   help="keep the thresholds, curve and test figures; (re)compute only the audit and drift "
                        "references the server's monitoring compares with (validation split)")
    p.add_argument("--audit-model", metavar="NAME:VERSION",
                   help="the version of the repository the shadow audit compares with (default: the version's own "
                        "fallback stage, else its teacher.model)")
    _calibration_args(p)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("serve", help="serve a model repository over HTTP and gRPC with early exit (v1 + KServe v2)",
                       description="Serve every model and version in REPO: /v1/.../classify, the KServe v2 / "
                                   "Triton HTTP endpoints, /metrics; with --grpc-port the KServe v2 / Triton gRPC service too. Every setting can also come from a RESKD_* "
                                   "environment variable (docs/serving.md, \"Settings\"); flags win over the "
                                   "environment.")
    p.add_argument("--repo", metavar="REPO", help="model repository (default: RESKD_REPO, else the bundled models/)")
    p.add_argument("--host", help="bind address (default 127.0.0.1; 0.0.0.0 in containers)")
    p.add_argument("--port", type=int, help="default 8000")
    p.add_argument("--grpc-port", type=int, metavar="PORT",
                   help="serve KServe v2's gRPC protocol (and grpc.health.v1) on this port too, e.g. 8001; 0: no gRPC "
                        "(default RESKD_GRPC_PORT, else 0)")
    p.add_argument("--device", choices=DEVICES,
                   help="auto: the CUDA EP when onnxruntime offers it, else CPU (default auto)")
    p.add_argument("--model-control", choices=["none", "poll", "explicit"],
                   help="none: load the repository once at start; poll: pick up new, changed and removed versions "
                        "every RESKD_REPOSITORY_POLL_S seconds and on SIGHUP; explicit: on POST "
                        "/v2/repository/models/NAME/load|unload (default none)")
    p.add_argument("--workers", type=int, metavar="N",
                   help="server processes sharing the port, each with its share of the cores (or its GPU); 0: one "
                        "per GPU under CUDA, else one per available core, at most 8 (default RESKD_WORKERS, else 0)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("score", help="score image files offline (local processes or Ray Data); JSONL/CSV/Parquet",
                       description="Classify every input image with the cascade and write one row per input: path, "
                                   "label, class_id, confidence, exit_stage, flops, flops_saved_vs_teacher, error (--audit adds the audit "
                                   "model's answer and the OOD score). "
                                   "An unreadable image becomes a row with `error` set; the job still exits 0. "
                                   "Exit status 2: the job could not run (the message says what to fix). "
                                   "See docs/scoring.md.")
    p.add_argument("--repo", required=True, metavar="REPO", help="model repository, e.g. models (the bundled one)")
    p.add_argument("--model", required=True, metavar="NAME[:VERSION]", help="default version: the highest")
    p.add_argument("inputs", nargs="+", metavar="INPUTS",
                   help="image files; directories (searched recursively for image files); glob patterns (quote "
                        "them; ** recurses); or lists of paths: .txt/.lst (one a line), .csv or .parquet (a "
                        "'path' column), relative paths being relative to the list's folder")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="output file; its extension picks the format: .jsonl, .csv or .parquet. Written whole or "
                        "not at all; work in progress is kept in FILE.parts/")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: decode worker processes + this process's runtime (default); ray: Ray Data on the "
                        "cluster named by RAY_ADDRESS, else a local Ray instance")
    p.add_argument("--resume", action="store_true",
                   help="continue the unfinished job in FILE.parts/ (same model and INPUTS): only the missing "
                        "shards are scored")
    p.add_argument("--labels", metavar="CSV",
                   help="true labels, for accuracy in the summary: CSV with header 'path,label', label a class "
                        "name of the model or a class id, paths relative to the CSV's folder")
    p.add_argument("--batch-size", type=int, default=512, help="images per runtime call (default 512)")
    p.add_argument("--shard-size", type=int, default=10_000,
                   help="inputs per committed shard: the most work a killed job loses (default 10000)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (the summary is still printed)")
    p.add_argument("--audit", action="store_true",
                   help="check every answer given before the last stage against the version's audit model (as the "
                        "server's shadow audit does) and flag images above the validation p99 of the stage-0 "
                        "energy score: adds the columns audit_label, audit_class_id, audit_agrees, ood_score, ood "
                        "and two summary lines")
    p.add_argument("--audit-model", metavar="NAME[:VERSION]",
                   help="the audit model, a version of REPO, in place of the manifest's (audit section, else "
                        "teacher.model): needed for a version whose manifest names none; implies --audit")
    g = p.add_argument_group("local engine")
    g.add_argument("--workers", type=int, help="decode processes (default: one per core, each also classifying "
                                               "on CPU; under CUDA one fewer, at least 1, as a core feeds the GPU; "
                                               "an explicit N is N; 0: everything in the main process)")
    g.add_argument("--threads", type=int, help="onnxruntime threads per stage (default: onnxruntime's)")
    g.add_argument("--device", choices=DEVICES, default="auto",
                   help="auto: the CUDA EP when onnxruntime offers it, else CPU (default auto)")
    g = p.add_argument_group("ray engine")
    g.add_argument("--actors", type=int, default=1, help="actors holding the cascade (default 1)")
    g.add_argument("--gpus-per-actor", type=float, default=0.0, metavar="G",
                   help="GPUs each actor reserves, e.g. 1 or 0.25; > 0 runs the cascade on CUDA (default 0)")
    p.set_defaults(func=cmd_score)
    return parser


def _positive(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _calibration_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--target-drop", type=_positive, metavar="PT",
                   help="minimise FLOPs with accuracy >= full cascade - PT points on validation (default: the "
                        "recipe's, 0.1)")
    g.add_argument("--flops-budget", type=_positive, metavar="PCT",
                   help="maximise accuracy with mean FLOPs <= PCT %% of the teacher's")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
