"""How a cascade version's stages execute: the engine under the runtime (and so under the server, `reskd score`,
`reskd calibrate` and the benchmarks). Two kinds, one interface:

- HostEngine (the CPU default): numpy arrays in and out, each stage run on exactly the rows it is given. On a CPU
  a padded row costs as much arithmetic as a real one, so nothing is padded.
- BoundEngine (the CUDA default; on CPU when asked, which is how the tests run it): onnxruntime IO binding on
  buffers allocated once. Batch sizes are rounded up to a few buckets; every (stage, bucket) has its binding made
  once, reading and writing fixed addresses, so with CUDA graphs on (`enable_cuda_graph`, one graph per bucket
  through the `gpu_graph_id` run option) each later call of that stage at that size is one graph launch:
    * a batch of the runtime is copied into the staging buffer of its bucket (the one host-to-device copy);
      stage 0 reads it in place;
    * a later stage's survivors are gathered on the device from the staging buffer into the shared `gathered`
      buffer by a small Gather graph, itself captured per (source bucket, destination bucket); its indices are
      refilled in place;
    * each stage writes its logits into its own fixed output buffer; only the real rows' logits come back to the
      host (what the exit decision needs).
  The stage scheduler of the server merges rows of several uploaded blocks into one batch: those rows are gathered
  by a Concat+Gather graph over up to `max_blocks` blocks (not captured: its inputs change from batch to batch)
  into the same `gathered` buffer, and the stage itself still runs as its captured graph.
  Fixed buffers mean one batch at a time: the engine's lock makes that so, whatever the caller does.

Padding rows repeat a real row (never garbage that could overflow) and are reported, so the server can count them.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import onnxruntime as ort

from .device import Device

Part = tuple[Any, np.ndarray]  # (a block from upload/stage_block, row indices in it)
EngineKind = Literal["auto", "host", "bound"]


@dataclass(frozen=True)
class EngineSpec:
    """kind: auto (bound on CUDA, host on CPU), host or bound. graphs: CUDA graphs for the bound engine (None: on
    CUDA yes; they need the CUDA EP). buckets: the batch sizes a bound engine pads to (the largest is the most rows
    one call takes: the runtime splits bigger batches). max_blocks: uploaded blocks one gathered batch may mix."""

    kind: EngineKind = "auto"
    graphs: bool | None = None
    buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    max_blocks: int = 8

    def resolve(self, device: Device) -> EngineSpec:
        kind = self.kind if self.kind != "auto" else ("bound" if device.cuda else "host")
        graphs = device.cuda and kind == "bound" if self.graphs is None else self.graphs
        if graphs and not (device.cuda and kind == "bound"):
            raise ValueError("CUDA graphs need the bound engine on a CUDA device")
        return EngineSpec(kind, graphs, tuple(sorted(set(self.buckets))), self.max_blocks)


class Buckets:
    """The batch sizes a bound engine runs; any batch is padded up to the smallest bucket that holds it."""

    def __init__(self, sizes):
        sizes = sorted(set(int(s) for s in sizes))
        if not sizes or sizes[0] < 1:
            raise ValueError(f"buckets must be positive batch sizes, got {sizes}")
        self.sizes = sizes

    @property
    def largest(self) -> int:
        return self.sizes[-1]

    def size(self, n: int) -> int:
        """The bucket for n rows (1 <= n <= largest)."""
        i = bisect.bisect_left(self.sizes, n)
        if n < 1 or i == len(self.sizes):
            raise ValueError(f"{n} rows do not fit a bucket (largest {self.largest})")
        return self.sizes[i]

    def chunks(self, n: int) -> list[slice]:
        """n rows as consecutive slices of at most the largest bucket."""
        return [slice(i, min(i + self.largest, n)) for i in range(0, n, self.largest)]


def gather_indices(parts: list[tuple[int, np.ndarray]], size: int) -> np.ndarray:
    """Rows to gather into a batch of `size`: each part's rows shifted by its block's offset in the concatenation,
    in order, then the first row repeated as padding. parts: (offset, rows) pairs."""
    indices = np.concatenate([offset + np.asarray(rows, np.int64) for offset, rows in parts]).astype(np.int64)
    if len(indices) > size:
        raise ValueError(f"{len(indices)} rows do not fit a batch of {size}")
    return np.concatenate([indices, np.full(size - len(indices), indices[0] if len(indices) else 0, np.int64)])


def gather_model(blocks: int, shape: tuple[int, ...]) -> bytes:
    """ONNX graph: float32 b0..b{K-1} [?, *shape] and indices [B] -> Concat(blocks)[indices] (no Concat for one
    block)."""
    from onnx import TensorProto, helper

    names = [f"b{i}" for i in range(blocks)]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["?", *shape]) for n in names]
    inputs.append(helper.make_tensor_value_info("indices", TensorProto.INT64, ["B"]))
    out = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["B", *shape])
    if blocks == 1:
        nodes = [helper.make_node("Gather", ["b0", "indices"], ["images"], axis=0)]
    else:
        nodes = [helper.make_node("Concat", names, ["all"], axis=0),
                 helper.make_node("Gather", ["all", "indices"], ["images"], axis=0)]
    graph = helper.make_graph(nodes, "gather_rows", inputs, [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


class Engine(Protocol):
    kind: str
    max_blocks: int
    lock: threading.RLock

    def upload(self, images: np.ndarray) -> Any:
        """A block the caller may keep while its rows wait for later stages (the server's stage scheduler)."""
        ...

    def stage_block(self, images: np.ndarray) -> Any:
        """A block valid until the next stage_block call (the runtime's run loop, under the lock)."""
        ...

    def run(self, stage: int, parts: list[Part]) -> tuple[np.ndarray, int]:
        """Stage `stage` on the parts' rows in order -> (float32 logits [rows, classes], padding rows run)."""
        ...

    def warm_up(self, batch_sizes: list[int] | None = None) -> None: ...


class HostEngine:
    kind = "host"
    max_blocks = 1 << 30

    def __init__(self, sessions: list[ort.InferenceSession]):
        self.sessions = sessions
        self.lock = threading.RLock()  # not needed for correctness here; the same interface as BoundEngine
        self.input_shape = tuple(sessions[0].get_inputs()[0].shape[1:])

    def upload(self, images: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(images, dtype=np.float32)

    stage_block = upload

    def logits(self, stage: int, images: np.ndarray) -> np.ndarray:
        return self.sessions[stage].run(["logits"], {"images": images})[0]

    def run(self, stage: int, parts: list[Part]) -> tuple[np.ndarray, int]:
        if len(parts) == 1 and len(parts[0][1]) == len(parts[0][0]) and _is_range(parts[0][1]):
            batch = parts[0][0]
        else:
            batch = np.concatenate([block[rows] for block, rows in parts])
        return self.logits(stage, batch), 0

    def warm_up(self, batch_sizes: list[int] | None = None) -> None:
        for n in batch_sizes or [1]:
            for s in range(len(self.sessions)):
                self.logits(s, np.zeros((n, *self.input_shape), np.float32))


def _is_range(rows: np.ndarray) -> bool:
    return len(rows) == 0 or (rows[0] == 0 and rows[-1] == len(rows) - 1 and bool(np.all(np.diff(rows) == 1)))


@dataclass(eq=False)
class DeviceBlock:
    """Images on the device: an uploaded block (value set) or the staging buffer of `bucket` (value None)."""
    rows: int  # real rows; the rest of the bucket is padding
    bucket: int
    value: ort.OrtValue | None = None


@dataclass
class _Call:
    """One prepared call: a binding on fixed addresses and its run options (the graph id when graphs are on)."""
    binding: ort.IOBinding
    options: ort.RunOptions
    calls: int = 0


@dataclass
class BoundStats:
    """What a BoundEngine has prepared and run (tests and benchmarks read it)."""
    buffers: dict[str, int] = field(default_factory=dict)  # name -> data pointer, fixed for the engine's life
    calls: dict[tuple, int] = field(default_factory=dict)  # call key -> times run


class BoundEngine:
    kind = "bound"

    def __init__(self, sessions: list[ort.InferenceSession], device: Device, input_shape: tuple[int, ...],
                 num_classes: int, *, buckets, graphs: bool, max_blocks: int):
        self.sessions = sessions
        self.device_name = "cuda" if device.cuda else "cpu"
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.buckets = Buckets(buckets)
        self.graphs = graphs
        self.max_blocks = max_blocks
        self.lock = threading.RLock()
        largest = self.buckets.largest
        # Buffers allocated once: their addresses are what captured graphs read and write.
        self.staging = {b: self._zeros((b, *self.input_shape), np.float32) for b in self.buckets.sizes}
        self.gathered = self._zeros((largest, *self.input_shape), np.float32)
        self.indices = self._zeros((largest,), np.int64)
        self.outputs = [self._zeros((largest, num_classes), np.float32) for _ in sessions]
        self._host_indices = np.zeros(largest, np.int64)
        self.gather_one = device.with_cuda_graphs(graphs).session(gather_model(1, self.input_shape), len(sessions))
        self.gather_many = device.with_cuda_graphs(False).session(gather_model(max_blocks, self.input_shape),
                                                                  len(sessions))
        self.empty = self._zeros((0, *self.input_shape), np.float32)
        self._calls: dict[tuple, _Call] = {}
        self._next_graph_id: dict[int, int] = {}

    # --- buffers and prepared calls --------------------------------------------------------------------------
    def _zeros(self, shape: tuple[int, ...], dtype) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype), self.device_name, 0)

    def _bind(self, binding: ort.IOBinding, name: str, value: ort.OrtValue, rows: int, output: bool) -> None:
        """Bind the first `rows` rows of a fixed buffer (same address, any row count up to its size)."""
        shape = [rows, *value.shape()[1:]]
        dtype = np.float32 if value.data_type() == "tensor(float)" else np.int64
        bind = binding.bind_output if output else binding.bind_input
        bind(name, self.device_name, 0, dtype, shape, value.data_ptr())

    def _call(self, key: tuple, session: ort.InferenceSession, inputs: list[tuple[str, ort.OrtValue, int]],
              output: tuple[str, ort.OrtValue, int]) -> _Call:
        call = self._calls.get(key)
        if call is None:
            binding = session.io_binding()
            for name, value, rows in inputs:
                self._bind(binding, name, value, rows, output=False)
            self._bind(binding, output[0], output[1], output[2], output=True)
            options = ort.RunOptions()
            if self.graphs:
                graph_id = self._next_graph_id.get(id(session), 1)  # 0 is reserved by onnxruntime
                self._next_graph_id[id(session)] = graph_id + 1
                options.add_run_config_entry("gpu_graph_id", str(graph_id))
            call = self._calls[key] = _Call(binding, options)
        return call

    def _run_call(self, key: tuple, session, inputs, output) -> _Call:
        call = self._call(key, session, inputs, output)
        session.run_with_iobinding(call.binding, call.options)
        call.calls += 1
        return call

    def stats(self) -> BoundStats:
        buffers = {f"staging{b}": v.data_ptr() for b, v in self.staging.items()}
        buffers.update(gathered=self.gathered.data_ptr(), indices=self.indices.data_ptr())
        buffers.update({f"logits{s}": v.data_ptr() for s, v in enumerate(self.outputs)})
        return BoundStats(buffers, {k: c.calls for k, c in self._calls.items()})

    # --- blocks ----------------------------------------------------------------------------------------------
    def _padded(self, images: np.ndarray, size: int) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.float32)
        if size > len(images):
            images = np.concatenate([images, np.repeat(images[:1], size - len(images), axis=0)])
        return images

    def stage_block(self, images: np.ndarray) -> DeviceBlock:
        """The images into the staging buffer of their bucket: valid until the next stage_block."""
        n = len(images)
        size = self.buckets.size(n)
        self.staging[size].update_inplace(self._padded(images, size))
        return DeviceBlock(n, size)

    def upload(self, images: np.ndarray) -> DeviceBlock:
        """A block of its own on the device (kept while its rows wait for later stages), padded to its bucket."""
        n = len(images)
        size = self.buckets.size(n)
        value = ort.OrtValue.ortvalue_from_numpy(self._padded(images, size), self.device_name, 0)
        return DeviceBlock(n, size, value)

    # --- running ---------------------------------------------------------------------------------------------
    def _stage(self, stage: int, source: str, bucket: int, rows: int) -> np.ndarray:
        """Stage on `bucket` rows of a fixed buffer (staging[bucket] or gathered) -> the real rows' logits."""
        images = self.staging[bucket] if source == "staging" else self.gathered
        call = self._run_call(("stage", stage, source, bucket), self.sessions[stage],
                              [("images", images, bucket)], ("logits", self.outputs[stage], bucket))
        return call.binding.copy_outputs_to_cpu()[0][:rows]

    def _gather_staged(self, block: DeviceBlock, rows: np.ndarray, size: int) -> None:
        """Rows of the staging buffer -> the first `size` rows of `gathered` (a captured graph per bucket pair)."""
        self._host_indices[:size] = gather_indices([(0, rows)], size)
        self.indices.update_inplace(self._host_indices)
        self._run_call(("gather", block.bucket, size), self.gather_one,
                       [("b0", self.staging[block.bucket], block.bucket), ("indices", self.indices, size)],
                       ("images", self.gathered, size))

    def _gather_uploaded(self, parts: list[Part], size: int) -> None:
        """Rows of several uploaded blocks -> the first `size` rows of `gathered` (not captured)."""
        offsets: dict[int, int] = {}
        blocks: list[DeviceBlock] = []
        for block, _ in parts:
            if id(block) not in offsets:
                offsets[id(block)] = sum(b.bucket for b in blocks)
                blocks.append(block)
        if len(blocks) > self.max_blocks:
            raise RuntimeError(f"a stage batch may gather from at most {self.max_blocks} blocks, got {len(blocks)}")
        indices = gather_indices([(offsets[id(block)], rows) for block, rows in parts], size)
        binding = self.gather_many.io_binding()
        for i in range(self.max_blocks):
            binding.bind_ortvalue_input(f"b{i}", blocks[i].value if i < len(blocks) else self.empty)
        binding.bind_cpu_input("indices", indices)
        self._bind(binding, "images", self.gathered, size, output=True)
        self.gather_many.run_with_iobinding(binding)

    def run(self, stage: int, parts: list[Part]) -> tuple[np.ndarray, int]:
        rows = sum(len(r) for _, r in parts)
        with self.lock:
            block, first = parts[0]
            if block.value is None:  # the staging buffer (the runtime's path)
                if any(b is not block for b, _ in parts):
                    raise ValueError("a staged block cannot be mixed with other blocks")
                if len(parts) > 1:
                    first = np.concatenate([r for _, r in parts])
                if rows == block.rows and _is_range(first):
                    return self._stage(stage, "staging", block.bucket, rows), block.bucket - rows
                size = self.buckets.size(rows)
                self._gather_staged(block, first, size)
                return self._stage(stage, "gathered", size, rows), size - rows
            size = self.buckets.size(rows)
            if len(parts) == 1 and rows == block.rows and _is_range(first) and not self.graphs:
                return self._direct(stage, block), block.bucket - rows  # a whole block, no graphs: no copy
            self._gather_uploaded(parts, size)
            return self._stage(stage, "gathered", size, rows), size - rows

    def _direct(self, stage: int, block: DeviceBlock) -> np.ndarray:
        session = self.sessions[stage]
        binding = session.io_binding()
        binding.bind_ortvalue_input("images", block.value)
        self._bind(binding, "logits", self.outputs[stage], block.bucket, output=True)
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0][:block.rows]

    def warm_up(self, batch_sizes: list[int] | None = None) -> None:
        """Every prepared call, three times: every stage at every bucket from the staging buffer and from
        `gathered`, every gather from a bucket into one no larger, and the uploaded-block gather at every size.
        onnxruntime captures a graph after its warm-up runs, so serving never captures, and cuDNN never meets a
        new shape. batch_sizes: ignored (every bucket is warmed)."""
        with self.lock:
            for size in self.buckets.sizes:
                images = np.zeros((size, *self.input_shape), np.float32)
                uploaded = self.upload(images)
                for _ in range(3):
                    block = self.stage_block(images)
                    for s in range(len(self.sessions)):
                        self._stage(s, "staging", size, size)
                    for smaller in self.buckets.sizes:
                        if smaller <= size:
                            self._gather_staged(block, np.arange(smaller), smaller)
                    self._gather_uploaded([(uploaded, np.arange(size))], size)
                    for s in range(len(self.sessions)):
                        self._stage(s, "gathered", size, size)


def make_engine(spec: EngineSpec, device: Device, sessions: list[ort.InferenceSession], input_shape,
                num_classes: int) -> HostEngine | BoundEngine:
    if spec.kind == "host":
        return HostEngine(sessions)
    return BoundEngine(sessions, device, input_shape, num_classes, buckets=spec.buckets, graphs=bool(spec.graphs),
                       max_blocks=spec.max_blocks)
