"""`reskd score --audit`: every answer given before the last stage checked against the version's audit model (another
version, or its own fallback stage), the stage-0 OOD score and flag against the manifest's drift.p99, the summary's
audit and drift lines, resume, and the jobs it refuses."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reskd import cli
from reskd.manifest import ModelRepository
from reskd.preprocess import preprocess
from reskd.runtime import CascadeRuntime
from reskd.scoring import ScoreError, ScoreOptions, score
from reskd.scoring.output import AUDIT_SCHEMA, read_output

from conftest import real_test_images

REPO = Path(__file__).resolve().parents[1] / "models"
AUDIT_COLUMNS = ["audit_label", "audit_class_id", "audit_agrees", "ood_score", "ood"]


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, list[Path]]:
    """40 real test images, 12 of noise (some answered early and against the teacher), a black one (above the
    validation p99 of the stage-0 energy score) and an unreadable file: -> (folder, the images' paths)."""
    root = tmp_path_factory.mktemp("audit-images")
    rng = np.random.default_rng(0)
    files = {f"real{i:02d}.png": data for i, data in enumerate(real_test_images(40))}
    files.update({f"noise{i}.png": png(rng.integers(0, 256, (28, 28), dtype=np.uint8)) for i in range(8)})
    files.update({f"faint{i}.png": png((rng.random((28, 28)) * 64).astype(np.uint8)) for i in range(4)})
    files["black.png"] = png(np.zeros((28, 28), np.uint8))
    for name, data in files.items():
        (root / name).write_bytes(data)
    (root / "broken.png").write_bytes(b"not an image")
    return root, sorted(root / name for name in files)


def run(inputs, model: str, out: Path, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("audit", True)
    return score(ScoreOptions(repo=str(kw.pop("repo", REPO)), model=model, inputs=[str(inputs[0])], out=str(out),
                              **kw))


def by_path(out: Path) -> dict[str, dict]:
    return {r["path"]: r for r in read_output(out).to_pylist()}


def check_rows(got: dict[str, dict], paths: list[Path], runtime: CascadeRuntime, reference: np.ndarray) -> None:
    """Each row's audit columns against the runtime's answers and the reference classes, computed here."""
    m = runtime.manifest
    result = runtime.run(np.stack([preprocess(p.read_bytes(), m.input) for p in paths]))
    last = runtime.num_stages - 1
    for p, c, stage, s0, ref in zip(paths, result.class_id, result.exit_stage, result.score0, reference):
        row = got[str(p)]
        assert (row["class_id"], row["exit_stage"]) == (c, stage)
        if stage < last:
            assert (row["audit_class_id"], row["audit_label"], row["audit_agrees"]) == (ref, m.labels[ref], c == ref)
        else:  # the cascade's final answer: not audited
            assert (row["audit_class_id"], row["audit_label"], row["audit_agrees"]) == (None, None, None)
        assert row["ood_score"] == pytest.approx(s0, abs=1e-5)
        assert row["ood"] == (row["ood_score"] > m.drift.p99)
    assert [k for k in got[str(paths[0])]] == AUDIT_SCHEMA.names
    broken = next(r for p, r in got.items() if p.endswith("broken.png"))
    assert broken["error"] and all(broken[k] is None for k in AUDIT_COLUMNS)


def check_summary(summary, got: dict[str, dict], runtime: CascadeRuntime, reference: str) -> None:
    m = runtime.manifest
    audited = [r for r in got.values() if r["audit_agrees"] is not None]
    scored = [r for r in got.values() if r["error"] is None]
    tally = summary.audit
    assert (tally.early, tally.agreed, tally.scored) == (len(audited), sum(r["audit_agrees"] for r in audited),
                                                          len(scored))
    assert tally.expected_agreement == pytest.approx(np.mean([m.audit.expected("default", r["exit_stage"])
                                                              for r in audited]))
    assert tally.ood == sum(r["ood"] for r in scored)
    lines = summary.lines()
    audit = next(line for line in lines if line.startswith("audit: "))
    assert audit.startswith(f"audit: {len(audited)} of {len(scored)} answers")
    assert f"checked against {reference}: agreement {100 * tally.agreement:.2f}% (95% CI " in audit
    assert f"validation {100 * tally.expected_agreement:.2f}% for answers at the same stages" in audit
    drift = next(line for line in lines if line.startswith("drift: "))
    assert drift.startswith(f"drift: {100 * tally.ood / len(scored):.2f}% of images ({tally.ood} of {len(scored)}) "
                            f"above the validation p99")
    assert drift.endswith(f"validation {100 * m.drift.above_p99:.2f}%")


def test_audited_against_another_version_with_worker_processes(inputs, tmp_path):
    """fashion-mnist:2 names fashion-mnist-teacher:2: the teacher, run whole on the same files."""
    out = tmp_path / "scores.parquet"
    summary = run(inputs, "fashion-mnist:2", out, workers=1, batch_size=16, shard_size=7)
    runtime = CascadeRuntime(REPO / "fashion-mnist" / "2")
    teacher = CascadeRuntime(REPO / "fashion-mnist-teacher" / "2")
    paths = inputs[1]
    reference = teacher.run(np.stack([preprocess(p.read_bytes(), teacher.manifest.input) for p in paths]),
                            early_exit=False).class_id
    got = by_path(out)
    check_rows(got, paths, runtime, reference)
    check_summary(summary, got, runtime, "fashion-mnist-teacher:2")
    rows = list(got.values())
    assert any(r["audit_agrees"] is False for r in rows) and any(r["audit_agrees"] for r in rows)
    assert any(r["audit_agrees"] is None and r["error"] is None for r in rows)  # answered at the last stage
    assert got[str(inputs[0] / "black.png")]["ood"] is True and sum(bool(r["ood"]) for r in rows) == 1


def test_audited_against_its_own_fallback_stage_from_the_command_line(inputs, tmp_path, capsys):
    """fashion-mnist-fallback:1 names its stage 2 (the teacher): its own logits, for the answers of stages 0-1."""
    out = tmp_path / "scores.jsonl"
    assert cli.main(["score", "--repo", str(REPO), "--model", "fashion-mnist-fallback:1", str(inputs[0]), "--out",
                     str(out), "--audit", "--workers", "0", "--quiet"]) == 0
    printed = capsys.readouterr().out.splitlines()
    runtime = CascadeRuntime(REPO / "fashion-mnist-fallback" / "1")
    paths = inputs[1]
    reference = runtime.stage_logits(2, np.stack([preprocess(p.read_bytes(), runtime.manifest.input)
                                                  for p in paths])).argmax(-1)
    got = by_path(out)
    check_rows(got, paths, runtime, reference)
    summary = run(inputs, "fashion-mnist-fallback:1", tmp_path / "again.csv", workers=0)
    check_summary(summary, by_path(tmp_path / "again.csv"), runtime, "stage 2 (teacher)")
    assert printed[-2:] == summary.lines()[-2:]
    assert any(r["audit_agrees"] is False for r in got.values())


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_the_audit_columns_round_trip_in_every_format(inputs, tmp_path, suffix):
    run(inputs, "fashion-mnist:2", tmp_path / "ref.parquet", workers=0)
    run(inputs, "fashion-mnist:2", tmp_path / f"scores{suffix}", workers=0, batch_size=5)
    table = read_output(tmp_path / f"scores{suffix}")
    assert table.schema == AUDIT_SCHEMA
    assert table.to_pylist() == read_output(tmp_path / "ref.parquet").to_pylist()


def test_an_interrupted_audit_job_resumes_and_only_with_audit(inputs, tmp_path, monkeypatch):
    from reskd.scoring import local

    reference = tmp_path / "ref.jsonl"
    run(inputs, "fashion-mnist:2", reference, workers=0)
    out = tmp_path / "scores.jsonl"
    real = local.LocalEngine.score

    def dies(self, paths, indices):
        for i, batch in enumerate(real(self, paths, indices)):
            if i == 2:
                raise RuntimeError("killed")
            yield batch

    monkeypatch.setattr(local.LocalEngine, "score", dies)
    with pytest.raises(RuntimeError, match="killed"):
        run(inputs, "fashion-mnist:2", out, workers=0, batch_size=5, shard_size=5)
    monkeypatch.setattr(local.LocalEngine, "score", real)
    assert len(list(tmp_path.glob("scores.jsonl.parts/shard-*.parquet"))) == 2
    with pytest.raises(ScoreError, match="different audit"):
        run(inputs, "fashion-mnist:2", out, workers=0, resume=True, audit=False)
    summary = run(inputs, "fashion-mnist:2", out, workers=0, batch_size=5, resume=True)
    assert read_output(out).to_pylist() == read_output(reference).to_pylist()
    assert summary.scored_now == summary.images - 10 and summary.audit.scored == summary.images - 1


@pytest.fixture(scope="module")
def bare_repo(tmp_path_factory) -> Path:
    """fashion-mnist:2 without its audit and drift sections (no teacher.model either), beside the teacher."""
    repo = tmp_path_factory.mktemp("repo")
    shutil.copytree(REPO / "fashion-mnist-teacher" / "2", repo / "fashion-mnist-teacher" / "2")
    shutil.copytree(REPO / "fashion-mnist" / "2", repo / "fashion-mnist" / "2")
    path = repo / "fashion-mnist" / "2" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["audit"], manifest["drift"]
    assert manifest["teacher"].get("model") is None
    path.write_text(json.dumps(manifest))
    return repo


def test_a_version_without_references_is_audited_against_the_model_named(inputs, bare_repo, tmp_path):
    out = tmp_path / "scores.parquet"
    summary = run(inputs, "fashion-mnist:2", out, repo=bare_repo, audit=False,
                  audit_model="fashion-mnist-teacher")  # implies --audit; the highest version
    got = read_output(out).to_pylist()
    want = read_output(_scored_with_references(inputs, tmp_path)).to_pylist()
    for a, b in zip(got, want):
        assert a == {**b, "ood": None}  # no drift.p99: no flag
    lines = summary.lines()
    assert "checked against fashion-mnist-teacher:2" in lines[-2]
    assert "no validation reference (the manifest has no audit section" in lines[-2]
    assert lines[-1].startswith("drift: the manifest has no drift reference")


def _scored_with_references(inputs, tmp_path) -> Path:
    out = tmp_path / "with-references.parquet"
    run(inputs, "fashion-mnist:2", out, workers=0)
    return out


@pytest.mark.parametrize("model, extra, message", [
    ("fashion-mnist:2", [], "fashion-mnist:2 has no audit reference (its manifest has no audit section and no "
                            "teacher.model): name one with --audit-model NAME:VERSION"),
    ("fashion-mnist-teacher:2", [], "has a single stage"),
    ("fashion-mnist:2", ["--audit-model", "nope:1"], "--audit-model: no model 'nope'"),
    ("fashion-mnist:2", ["--audit-model", "fashion-mnist-teacher:7"], "has no version 7"),
])
def test_audits_that_cannot_run_exit_2_saying_what_to_fix(inputs, bare_repo, tmp_path, capsys, model, extra,
                                                          message):
    out = tmp_path / "o.jsonl"
    assert cli.main(["score", "--repo", str(bare_repo), "--model", model, str(inputs[0]), "--out", str(out),
                     "--audit", "--quiet", *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not out.with_name("o.jsonl.parts").exists()


def test_the_audit_reference_the_manifest_names_is_used():
    """The server's order: the manifest's audit section, else teacher.model; --audit-model replaces both."""
    from reskd.scoring.audit import audit_plan

    repo = ModelRepository(REPO)
    plan = audit_plan(repo, repo.load("fashion-mnist-fallback", 1)[1], None)
    assert (plan.stage, plan.model_dir, plan.last_stage) == (2, None, 2)
    plan = audit_plan(repo, repo.load("fashion-mnist", 1)[1], None)
    assert plan.reference == "fashion-mnist-teacher:1" and plan.expected is not None
    plan = audit_plan(repo, repo.load("fashion-mnist", 1)[1], "fashion-mnist-teacher:2")
    assert plan.reference == "fashion-mnist-teacher:2" and plan.expected is None
    assert "validation figures are against fashion-mnist-teacher:1" in plan.no_expected
