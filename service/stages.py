"""How one stage runs on a batch assembled from several requests' rows. The scheduler only sees `upload` (a
stage-0 batch's images become a block) and `run` (a stage on rows gathered from up to `max_blocks` blocks).

- HostStages (CPU): blocks are numpy arrays; rows are gathered with numpy.
- BoundStages (CUDA, or any provider): onnxruntime IO binding. Each block is uploaded to the device once; later
  stages gather their rows from the blocks on the device with a small Concat+Gather graph (an OrtValue cannot be
  sliced), so images never travel back to the host. Batches are padded to a few bucket sizes, warmed at start,
  so kernels (cuDNN algorithm choice) never meet a new shape while serving; padding rows are counted.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from reskd.runtime import CascadeRuntime

Part = tuple[Any, np.ndarray]  # (block, row indices in the block)


class StageRunner(Protocol):
    max_blocks: int

    def upload(self, images: np.ndarray) -> Any: ...

    def run(self, stage: int, parts: list[Part]) -> tuple[np.ndarray, int]:
        """-> (float32 logits [rows, classes], padding rows executed)."""
        ...

    def warm_up(self) -> None: ...


class HostStages:
    max_blocks = 1 << 30

    def __init__(self, runtime: CascadeRuntime, warmup_batch_sizes: list[int]):
        self.runtime = runtime
        self.warmup_batch_sizes = warmup_batch_sizes

    def upload(self, images: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(images, dtype=np.float32)

    def run(self, stage: int, parts: list[Part]) -> tuple[np.ndarray, int]:
        if len(parts) == 1 and len(parts[0][1]) == len(parts[0][0]):
            batch = parts[0][0]
        else:
            batch = np.concatenate([block[rows] for block, rows in parts])
        return self.runtime.stage_logits(stage, batch), 0

    def warm_up(self) -> None:
        c, h, w = self.runtime.input_shape
        for n in self.warmup_batch_sizes:
            for s in range(self.runtime.num_stages):
                self.runtime.stage_logits(s, np.zeros((n, c, h, w), np.float32))


def gather_model(max_blocks: int, shape: tuple[int, int, int]) -> bytes:
    """ONNX graph: blocks b0..b{K-1} [?, C, H, W] and indices [B] -> Concat(blocks)[indices]."""
    from onnx import TensorProto, helper

    names = [f"b{i}" for i in range(max_blocks)]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["?", *shape]) for n in names]
    inputs.append(helper.make_tensor_value_info("indices", TensorProto.INT64, ["B"]))
    out = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["B", *shape])
    nodes = [helper.make_node("Concat", names, ["all"], axis=0),
             helper.make_node("Gather", ["all", "indices"], ["images"], axis=0)]
    graph = helper.make_graph(nodes, "gather_rows", inputs, [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


@dataclass(eq=False)
class DeviceBlock:
    value: ort.OrtValue  # [bucket, C, H, W] on the device
    rows: int  # real rows; the rest is padding


class BoundStages:
    def __init__(self, runtime: CascadeRuntime, *, device: str, buckets: list[int], max_blocks: int = 8):
        self.runtime = runtime
        self.device = device  # "cuda" or "cpu" (the latter lets tests run this path without a GPU)
        self.buckets = sorted(set(buckets))
        self.max_blocks = max_blocks
        self.shape = runtime.input_shape
        self.gather = runtime.device.session(gather_model(max_blocks, self.shape), runtime.num_stages)
        self.empty = self._to_device(np.zeros((0, *self.shape), np.float32))

    def _to_device(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array, dtype=np.float32), self.device, 0)

    def bucket(self, n: int) -> int:
        i = bisect.bisect_left(self.buckets, n)
        return self.buckets[i] if i < len(self.buckets) else n

    def upload(self, images: np.ndarray) -> DeviceBlock:
        """One host-to-device copy per stage-0 batch, padded to its bucket."""
        n = len(images)
        size = self.bucket(n)
        if size > n:
            images = np.concatenate([images, np.zeros((size - n, *self.shape), np.float32)])
        return DeviceBlock(self._to_device(images), n)

    def _stage(self, stage: int, images: ort.OrtValue) -> np.ndarray:
        session = self.runtime.sessions[stage]
        binding = session.io_binding()
        binding.bind_ortvalue_input("images", images)
        binding.bind_output("logits", "cpu")
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def _gather(self, parts: list[Part], size: int) -> ort.OrtValue:
        """The parts' rows, in order, then copies of the first row up to size: one device tensor."""
        offsets: dict[int, int] = {}
        blocks: list[DeviceBlock] = []
        for block, _ in parts:
            if id(block) not in offsets:
                offsets[id(block)] = sum(b.value.shape()[0] for b in blocks)
                blocks.append(block)
        if len(blocks) > self.max_blocks:
            raise RuntimeError(f"a stage batch may gather from at most {self.max_blocks} blocks, got {len(blocks)}")
        indices = np.concatenate([offsets[id(block)] + rows for block, rows in parts]).astype(np.int64)
        if size > len(indices):
            indices = np.concatenate([indices, np.full(size - len(indices), indices[0], np.int64)])
        binding = self.gather.io_binding()
        for i in range(self.max_blocks):
            binding.bind_ortvalue_input(f"b{i}", blocks[i].value if i < len(blocks) else self.empty)
        binding.bind_cpu_input("indices", indices)
        binding.bind_output("images", self.device)
        self.gather.run_with_iobinding(binding)
        return binding.get_outputs()[0]

    def run(self, stage: int, parts: list[Part]) -> tuple[np.ndarray, int]:
        rows = sum(len(r) for _, r in parts)
        block = parts[0][0]
        if len(parts) == 1 and rows == block.rows and np.array_equal(parts[0][1], np.arange(rows)):
            return self._stage(stage, block.value)[:rows], block.value.shape()[0] - rows  # whole block: no gather
        size = self.bucket(rows)
        return self._stage(stage, self._gather(parts, size))[:rows], size - rows

    def warm_up(self) -> None:
        """Every stage and the gather graph at every bucket size, so serving never meets a new shape."""
        for size in self.buckets:
            block = self.upload(np.zeros((size, *self.shape), np.float32))
            for s in range(self.runtime.num_stages):
                self.run(s, [(block, np.arange(size))])
                self._stage(s, self._gather([(block, np.arange(size)[::-1].copy())], size))
