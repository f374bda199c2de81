"""`reskd score`: one row per input with the runtime's answer and compute, bad files as error rows, atomic output,
resume after a real kill, three output formats, and the Ray Data engine giving the local engine's rows."""

from __future__ import annotations

import csv
import gzip
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from reskd import cli
from reskd.manifest import ModelRepository
from reskd.preprocess import preprocess
from reskd.runtime import CascadeRuntime
from reskd.scoring import ScoreError, ScoreOptions, score
from reskd.scoring.inputs import collect_inputs
from reskd.scoring.output import SCHEMA, read_output

from conftest import real_fashion_mnist_or_fail

REPO = Path(__file__).resolve().parents[1] / "models"
MODEL = "fashion-mnist"
N_REAL = 40


def real_test_images(n: int) -> tuple[np.ndarray, np.ndarray]:
    root = real_fashion_mnist_or_fail()
    with gzip.open(root / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read()[16:16 + n * 784], np.uint8).reshape(n, 28, 28)
    with gzip.open(root / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read()[8:8 + n], np.uint8)
    return images, labels


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory) -> tuple[Path, list[Path], np.ndarray]:
    """40 real test images as PNG (some under a subfolder) plus four bad files: -> (dir, good paths, labels)."""
    root = tmp_path_factory.mktemp("images")
    images, labels = real_test_images(N_REAL)
    good = []
    for i, img in enumerate(images):
        path = root / ("shoes" if i % 3 == 0 else "") / f"img{i:03d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(img).save(path)
        good.append(path)
    png = good[1].read_bytes()
    (root / "bad-corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (root / "bad-truncated.png").write_bytes(png[: len(png) // 2])
    (root / "bad-empty.png").write_bytes(b"")
    (root / "bad-text.jpg").write_text("not an image at all\n")
    (root / ".hidden.png").write_bytes(png)  # hidden: not picked up from a directory
    (root / "notes.md").write_text("not an image suffix: not picked up from a directory\n")
    return root, good, labels


def options(inputs, out, **kw) -> ScoreOptions:
    kw.setdefault("progress", False)
    return ScoreOptions(repo=str(REPO), model=MODEL, inputs=[str(i) for i in inputs], out=str(out), **kw)


def rows(path) -> list[dict]:
    return read_output(path).to_pylist()


def expected_rows(paths: list[Path]) -> dict[str, dict]:
    """What the runtime says about each good image, decoded one at a time with reskd.preprocess."""
    version_dir, manifest = ModelRepository(REPO).load(MODEL)
    runtime = CascadeRuntime(version_dir)
    result = runtime.run(np.stack([preprocess(p.read_bytes(), manifest.input) for p in paths]))
    return {str(p): {"path": str(p), "label": manifest.labels[c], "class_id": int(c), "confidence": float(conf),
                     "exit_stage": int(s), "flops": int(f), "flops_saved_vs_teacher": manifest.teacher.flops - int(f),
                     "error": None}
            for p, c, conf, s, f in zip(paths, result.class_id, result.confidence, result.exit_stage, result.flops)}


@pytest.fixture(scope="module")
def local_run(images_dir, tmp_path_factory):
    """The directory scored once by the local engine with real decode workers: (out, summary)."""
    root, good, labels = images_dir
    labels_csv = root / "labels.csv"
    with open(labels_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for i, (p, y) in enumerate(zip(good, labels)):  # class names and ids are both accepted
            w.writerow([p.relative_to(root), MANIFEST_LABELS[y] if i % 2 else int(y)])
    out = tmp_path_factory.mktemp("local") / "scores.parquet"
    summary = score(options([root], out, labels=str(labels_csv), workers=1, batch_size=16, shard_size=7))
    return out, summary


MANIFEST_LABELS = ModelRepository(REPO).load(MODEL)[1].labels
STAGES = len(ModelRepository(REPO).load(MODEL)[1].stages)
LATEST = ModelRepository(REPO).versions(MODEL)[-1]  # what scoring MODEL without a version uses


def test_every_input_gets_the_runtimes_answer_and_compute(images_dir, local_run):
    root, good, labels = images_dir
    out, summary = local_run
    got = rows(out)
    paths = collect_inputs([str(root)])
    assert [r["path"] for r in got] == paths  # one row per input, in input order
    assert len(paths) == N_REAL + 4 and not any(".hidden" in p or p.endswith(".md") for p in paths)
    want = expected_rows(good)
    for row in got:
        if "bad-" not in row["path"]:
            assert row == want[row["path"]]
    assert summary.images == N_REAL + 4 and summary.failures == 4
    assert summary.exits == np.bincount([w["exit_stage"] for w in want.values()], minlength=STAGES).tolist()
    assert summary.mean_flops == pytest.approx(np.mean([w["flops"] for w in want.values()]))
    correct = sum(want[str(p)]["class_id"] == y for p, y in zip(good, labels))
    assert (summary.labelled, summary.correct) == (N_REAL, correct)
    assert not out.with_name(out.name + ".parts").exists()


@pytest.mark.parametrize("name, message", [("bad-corrupt.png", "cannot identify an image"),
                                           ("bad-truncated.png", "truncated"),
                                           ("bad-empty.png", "empty image"),
                                           ("bad-text.jpg", "cannot identify an image")])
def test_bad_files_become_error_rows(local_run, name, message):
    row = next(r for r in rows(local_run[0]) if r["path"].endswith(name))
    assert message in row["error"]
    assert {k: v for k, v in row.items() if k not in ("path", "error")} == dict.fromkeys(
        ["label", "class_id", "confidence", "exit_stage", "flops", "flops_saved_vs_teacher"])


def test_listed_paths_that_cannot_be_read_are_error_rows_not_failures(images_dir, tmp_path):
    root, good, _ = images_dir
    listing = tmp_path / "list.txt"
    listing.write_text(f"# a comment\n{good[0]}\n\nmissing.png\n{root}\n{root / 'notes.md'}\n")
    summary = score(options([listing], tmp_path / "out.jsonl", workers=0))
    got = rows(tmp_path / "out.jsonl")
    assert [r["path"] for r in got] == [str(good[0]), str(tmp_path / "missing.png"), str(root),
                                        str(root / "notes.md")]
    assert got[0]["error"] is None
    assert "No such file" in got[1]["error"] and "Is a directory" in got[2]["error"]
    assert "cannot identify an image" in got[3]["error"]
    assert summary.failures == 3


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_output_formats_round_trip(local_run, images_dir, tmp_path, suffix, monkeypatch):
    reference = read_output(local_run[0])
    monkeypatch.chdir(tmp_path)  # a relative name with a colon, as a model reference makes one (was read as a URI)
    out = Path(f"scores-fashion-mnist:2{suffix}")
    score(options([images_dir[0]], out, workers=0, batch_size=64))
    table = read_output(out)
    assert table.schema == SCHEMA
    assert table.to_pylist() == reference.to_pylist()  # exact, confidences included


def test_inputs_expand_dirs_globs_and_lists_in_order(images_dir, tmp_path):
    root, good, _ = images_dir
    shoes = sorted(str(p) for p in (root / "shoes").glob("*.png"))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("../x.png\n/abs/y.png\n")
    with open(tmp_path / "b.csv", "w") as f:
        f.write("label,path\nBag,z.png\n")
    pq.write_table(pa.table({"path": ["p.png", "q.png"]}), tmp_path / "c.parquet")
    got = collect_inputs([str(root / "shoes"), str(tmp_path / "sub" / "*.txt"), str(tmp_path / "b.csv"),
                          str(tmp_path / "c.parquet"), str(good[1]), str(root / "**" / "img00[0-3].png")])
    assert got == shoes + [str(tmp_path / "sub" / "../x.png"), "/abs/y.png", str(tmp_path / "z.png"),
                           str(tmp_path / "p.png"), str(tmp_path / "q.png"), str(good[1]),
                           str(root / "img001.png"), str(root / "img002.png"), str(root / "shoes" / "img000.png"),
                           str(root / "shoes" / "img003.png")]


@pytest.mark.parametrize("argv, message", [
    (["--model", "nope", "IMG", "--out", "o.jsonl"], "no model 'nope'"),
    (["--model", MODEL, "missing-dir", "--out", "o.jsonl"], "no such file or directory"),
    (["--model", MODEL, "*.nothing", "--out", "o.jsonl"], "matches no files"),
    (["--model", MODEL, "IMG", "--out", "o.txt"], "use one of .csv, .jsonl, .parquet, .pq"),
    (["--model", MODEL, "IMG", "--out", "o.jsonl", "--labels", "bad-labels.csv"], "neither a class name"),
])
def test_jobs_that_cannot_run_exit_2_saying_what_to_fix(images_dir, tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad-labels.csv").write_text("path,label\nx.png,Jumper\n")
    argv = [str(images_dir[1][0]) if a == "IMG" else a for a in argv]
    assert cli.main(["score", "--repo", str(REPO), "--quiet", *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def _start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "reskd.cli", "score", "--repo", str(REPO), "--model", MODEL,
                             "--quiet", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: the kill takes its workers too


def test_killed_job_resumes_with_exactly_one_row_per_input(images_dir, tmp_path):
    root, good, _ = images_dir
    # Input 30 is a FIFO: the worker reading it blocks until the job is killed, after shards 0-5 (inputs 0-29)
    # are committed, which makes the interruption point deterministic.
    paths = [str(p) for p in good[:30]] + [str(tmp_path / "late.png")] + [str(p) for p in good[30:]]
    os.mkfifo(tmp_path / "late.png")
    (tmp_path / "inputs.txt").write_text("\n".join(paths) + "\n")
    out = tmp_path / "scores.csv"
    parts = tmp_path / "scores.csv.parts"
    job = ["--batch-size", "5", "--shard-size", "5", "--workers", "1", str(tmp_path / "inputs.txt"), "--out", str(out)]
    proc = _start(job)
    deadline = time.monotonic() + 60
    while len(list(parts.glob("shard-*.parquet"))) < 6 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert sorted(p.name for p in parts.iterdir()) == ["job.json"] + [f"shard-{k:08d}.parquet" for k in range(6)]
    assert not out.exists()  # never a partial output

    os.remove(tmp_path / "late.png")
    Image.open(good[0]).save(tmp_path / "late.png")
    again = _start(job)
    assert again.wait(60) == 2 and "pass --resume" in again.stderr.read()

    resumed = _start(job + ["--resume"])
    assert resumed.wait(60) == 0, resumed.stderr.read()
    assert f"{len(paths)} images" in resumed.stdout.read()
    got = rows(out)
    assert [r["path"] for r in got] == paths
    want = expected_rows([Path(p) for p in paths])
    assert got == [want[p] for p in paths]
    assert not parts.exists()


def test_resume_refuses_different_inputs(images_dir, tmp_path):
    root, good, _ = images_dir
    out = tmp_path / "o.jsonl"
    parts = tmp_path / "o.jsonl.parts"
    parts.mkdir()
    (parts / "job.json").write_text(f'{{"model": "{MODEL}:{LATEST}", "inputs": 3, "shard_size": 2, '
                                    '"manifest_sha256": "x", "inputs_sha256": "y"}')
    with pytest.raises(ScoreError, match="different manifest_sha256, inputs_sha256, inputs"):
        score(options(good[:2], out, resume=True, workers=0))


def test_torch_free():
    code = ("import sys\nsys.modules['torch'] = None\nsys.modules['torchvision'] = None\n"
            "import reskd.scoring, reskd.scoring.local, reskd.scoring.ray_engine\nprint('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_engine_gives_the_local_engines_rows(ray_local, images_dir, local_run, tmp_path):
    out = tmp_path / "ray.jsonl"
    summary = score(options([images_dir[0]], out, engine="ray", batch_size=8, shard_size=5, actors=2))
    local = rows(local_run[0])
    got = rows(out)
    assert [r["path"] for r in got] == [r["path"] for r in local]
    for a, b in zip(got, local):
        assert {k: v for k, v in a.items() if k != "confidence"} == {k: v for k, v in b.items() if k != "confidence"}
        assert (a["confidence"] is None and b["confidence"] is None) or abs(a["confidence"] - b["confidence"]) <= 1e-6
    assert (summary.failures, summary.exits) == (local_run[1].failures, local_run[1].exits)
    assert ray_local.is_initialized()  # a caller's Ray instance is used, not shut down


def test_ray_engine_audits_as_the_local_engine(ray_local, images_dir, tmp_path):
    """--audit on Ray: the audit version's files travel to the actors, and the rows and summary lines are the local
    engine's (tests/test_score_audit.py checks those against the audit model itself)."""
    local = score(options([images_dir[0]], tmp_path / "local.jsonl", workers=0, audit=True))
    ray = score(options([images_dir[0]], tmp_path / "ray.jsonl", engine="ray", batch_size=8, shard_size=5, actors=2,
                        audit=True))
    got, want = rows(tmp_path / "ray.jsonl"), rows(tmp_path / "local.jsonl")
    assert [r["path"] for r in got] == [r["path"] for r in want]
    for a, b in zip(got, want):
        for key in ("confidence", "ood_score"):
            assert (a[key] is None and b[key] is None) or abs(a.pop(key) - b.pop(key)) <= 1e-6
        assert a == b
    assert any(r["audit_agrees"] is not None for r in got)
    assert ray.lines()[-2:] == local.lines()[-2:]


def test_workers_under_cuda_default_to_one_fewer_and_an_explicit_count_is_kept(monkeypatch):
    """Under CUDA the main process feeds the GPU, so the default is one decode process fewer than the cores; an
    explicit --workers N is what the user asked for. (No GPU here: the device and the GPU runtime are stood in for;
    nothing is scored.)"""
    from types import SimpleNamespace

    from reskd.scoring import local

    monkeypatch.setattr(local, "scoring_device", lambda name, threads: SimpleNamespace(cuda=True))
    monkeypatch.setattr(local, "CascadeRuntime", lambda *a, **kw: SimpleNamespace())
    monkeypatch.setattr(local.os, "cpu_count", lambda: 4)
    version_dir = ModelRepository(REPO).load(MODEL)[0]
    assert local.LocalEngine(version_dir).workers == 3
    assert local.LocalEngine(version_dir, workers=3).workers == 3
    assert local.LocalEngine(version_dir, workers=1).workers == 1
    monkeypatch.setattr(local.os, "cpu_count", lambda: 1)
    assert local.LocalEngine(version_dir).workers == 1
