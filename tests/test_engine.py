"""The engine under the runtime, on CPU: bucket choice and padding, gather indices, and the bound engine's fixed
buffers and prepared calls (what CUDA graphs capture on a GPU), each giving what the host engine gives."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from reskd.device import Device
from reskd.engine import Buckets, EngineSpec, gather_indices, images_part
from reskd.runtime import CascadeRuntime
from server_process import MODELS

CASCADE = MODELS / "fashion-mnist" / "1"
BUCKETS = (1, 4, 16, 64)


@pytest.fixture(scope="module")
def host():
    return CascadeRuntime(CASCADE, device=Device.cpu())


@pytest.fixture(scope="module")
def bound():
    rt = CascadeRuntime(CASCADE, device=Device.cpu(), engine=EngineSpec("bound", buckets=BUCKETS, max_blocks=3))
    rt.engine.warm_up()
    return rt


def images(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 1, 28, 28)).astype(np.float32)


def test_a_batch_is_padded_to_the_smallest_bucket_that_holds_it():
    b = Buckets([16, 1, 4, 4, 64])
    assert b.sizes == [1, 4, 16, 64]
    assert [b.size(n) for n in (1, 2, 4, 5, 16, 17, 64)] == [1, 4, 4, 16, 16, 64, 64]
    with pytest.raises(ValueError, match="do not fit a bucket"):
        b.size(65)
    with pytest.raises(ValueError):
        b.size(0)
    assert b.chunks(150) == [slice(0, 64), slice(64, 128), slice(128, 150)]
    assert b.chunks(64) == [slice(0, 64)]
    with pytest.raises(ValueError, match="positive"):
        Buckets([0, 4])


def test_gather_indices_shift_each_block_and_pad_with_a_real_row():
    got = gather_indices([(0, np.array([3, 1])), (16, np.array([0, 2])), (0, np.array([5]))], 8)
    np.testing.assert_array_equal(got, [3, 1, 16, 18, 5, 3, 3, 3])
    assert got.dtype == np.int64
    np.testing.assert_array_equal(gather_indices([(4, np.array([0]))], 1), [4])
    with pytest.raises(ValueError, match="do not fit"):
        gather_indices([(0, np.arange(5))], 4)


def test_the_spec_resolves_per_device_and_refuses_graphs_without_cuda():
    cpu = Device.cpu()
    assert EngineSpec().resolve(cpu).kind == "host" and not EngineSpec().resolve(cpu).graphs
    assert EngineSpec("bound").resolve(cpu).graphs is False
    with pytest.raises(ValueError, match="CUDA graphs need"):
        EngineSpec("bound", graphs=True).resolve(cpu)
    assert not cpu.with_cuda_graphs(True).cuda_graphs  # nothing to capture on a CPU


@pytest.mark.parametrize("n", [1, 3, 16, 50, 64, 150])
def test_the_bound_engine_gives_what_the_host_engine_gives(host, bound, n):
    x = images(n, seed=n)
    rng = np.random.default_rng(n)
    thresholds = rng.choice([None, 0.0, 0.6, 0.9, 1.0], size=n).tolist()
    max_stage = rng.choice([None, 0, 1, 2], size=n).tolist()
    want = host.run(x, threshold=thresholds, max_stage=max_stage)
    got = bound.run(x, threshold=thresholds, max_stage=max_stage)
    np.testing.assert_array_equal(got.exit_stage, want.exit_stage)
    np.testing.assert_array_equal(got.class_id, want.class_id)
    np.testing.assert_array_equal(got.flops, want.flops)
    np.testing.assert_allclose(got.logits, want.logits, atol=1e-5)
    assert len(set(got.exit_stage.tolist())) > 1 or n < 16  # survivors were gathered, not only whole batches
    np.testing.assert_allclose(bound.all_stage_logits(x), host.all_stage_logits(x), atol=1e-5)


def test_buffers_are_allocated_once_and_serving_prepares_no_new_call_after_warm_up(bound):
    before = bound.engine.stats()
    # After warm-up every (stage, source, bucket) and every gather between buckets has its prepared call: those
    # are what a GPU captures as graphs. Arbitrary batches reuse them; none is added while serving.
    stages = bound.num_stages
    keys = set(before.calls)
    assert {("stage", s, (("images", "staging"),), b) for s in range(stages) for b in BUCKETS} <= keys
    assert {("stage", s, (("images", "gathered:images"),), b) for s in range(stages) for b in BUCKETS} <= keys
    assert {("gather", "images", "staging", big, small) for big in BUCKETS for small in BUCKETS
            if small <= big} <= keys
    for n in (1, 2, 7, 33, 64, 100, 129):
        bound.run(images(n, seed=100 + n), threshold=0.7)
    after = bound.engine.stats()
    assert after.buffers == before.buffers  # same addresses: a captured graph would read the new data
    assert set(after.calls) == keys
    assert sum(after.calls.values()) > sum(before.calls.values())


def test_padding_rows_are_reported_and_repeat_a_real_row(bound):
    engine = bound.engine
    x = images(5)
    block = engine.stage_block(x)
    logits, padding, _ = engine.run(0, [images_part(block, np.arange(5))])
    assert padding == 16 - 5 and logits.shape == (5, 10)
    logits_rows, padding, _ = engine.run(0, [images_part(block, np.array([4, 0]))])
    assert padding == 4 - 2
    np.testing.assert_allclose(logits_rows, logits[[4, 0]], atol=1e-5)
    # one block, several parts
    parts, padding, _ = engine.run(2, [images_part(block, np.array([3])), images_part(block, np.array([1, 2]))])
    assert padding == 4 - 3
    np.testing.assert_allclose(parts, bound.stage_logits(2, x[[3, 1, 2]]), atol=1e-5)
    uploaded = [engine.upload(x[:3]), engine.upload(x[3:])]
    with pytest.raises(ValueError, match="staged block cannot be mixed"):
        engine.run(0, [images_part(engine.stage_block(x), np.array([0])), images_part(uploaded[0], np.array([0]))])
    merged, padding, _ = engine.run(1, [images_part(uploaded[1], np.array([1])),
                                        images_part(uploaded[0], np.array([0, 2]))])
    assert padding == 4 - 3
    np.testing.assert_allclose(merged, bound.stage_logits(1, x[[4, 0, 2]]), atol=1e-5)


def test_threads_sharing_a_bound_engine_get_their_own_answers(host, bound):
    batches = [images(n, seed=200 + n) for n in (3, 40, 70, 9, 64, 1, 17, 120)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda x: bound.run(x), batches))
    for x, got in zip(batches, results):
        want = host.run(x)
        np.testing.assert_array_equal(got.class_id, want.class_id)
        np.testing.assert_array_equal(got.exit_stage, want.exit_stage)
