"""The runtime's per-sample settings: one batch holding requests with different thresholds and max_stage gives
each sample exactly what a call of its own would."""

from __future__ import annotations

import numpy as np
import pytest

from reskd.device import Device
from reskd.runtime import CascadeRuntime
from server_process import MODELS


@pytest.fixture(scope="module")
def rt():
    return CascadeRuntime(MODELS / "fashion-mnist" / "1", device=Device.cpu())


def test_per_sample_settings_equal_separate_calls(rt):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(60, 1, 28, 28)).astype(np.float32)
    groups = [(None, None), (1.0, None), (0.0, None), (1.0, 1), (None, 0), (0.7, 2)]
    thresholds = [groups[i % len(groups)][0] for i in range(60)]
    max_stages = [groups[i % len(groups)][1] for i in range(60)]
    stages_seen = []
    mixed = rt.run(images, threshold=thresholds, max_stage=max_stages,
                   on_stage=lambda s, n, seconds: stages_seen.append((s, n)))
    for g, (threshold, max_stage) in enumerate(groups):
        idx = np.arange(g, 60, len(groups))
        alone = rt.run(images[idx], threshold=threshold, max_stage=max_stage)
        np.testing.assert_array_equal(mixed.exit_stage[idx], alone.exit_stage)
        np.testing.assert_array_equal(mixed.class_id[idx], alone.class_id)
        np.testing.assert_array_equal(mixed.flops[idx], alone.flops)
        np.testing.assert_allclose(mixed.logits[idx], alone.logits, atol=1e-6)
    assert len(set(mixed.exit_stage.tolist())) == 3
    # on_stage saw each stage once, with the samples still undecided.
    assert [s for s, _ in stages_seen] == [0, 1, 2]
    assert stages_seen[0][1] == 60
    assert stages_seen[1][1] == int((mixed.exit_stage >= 1).sum())
    assert stages_seen[2][1] == int((mixed.exit_stage == 2).sum())


def test_per_sample_settings_are_checked(rt):
    images = np.zeros((2, 1, 28, 28), np.float32)
    with pytest.raises(ValueError, match="2 images"):
        rt.run(images, threshold=[0.5])
    with pytest.raises(ValueError, match="max_stage must be between 0 and 2"):
        rt.run(images, max_stage=[0, 3])
    with pytest.raises(ValueError, match="threshold must be between 0 and 1"):
        rt.run(images, threshold=[0.5, -0.1])
