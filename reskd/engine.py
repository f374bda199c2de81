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

Stage inputs (a Plan): a stage may read named outputs of earlier stages (e.g. the student's feature map) besides
or instead of the images. Such an output is "carried": the host engine returns it as an array; the bound engine
writes it into a fixed device buffer of its own (what a captured graph needs) and, when the caller keeps blocks
across batches (the server's stage scheduler, `keep=True`), copies it into a block of its own on the device. A
later stage gathers the rows of its survivors from wherever each source is, as for images: nothing goes back to
the host but the logits.

Padding rows repeat a real row (never garbage that could overflow) and are reported, so the server can count them.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol

import numpy as np
import onnxruntime as ort

from .device import Device
from .manifest import IMAGES, Manifest

# Where one part of a batch is: for each source a stage may read ("images", or "STAGE.OUTPUT" carried from an
# earlier stage), the block that holds it and the part's row indices in that block. Every source of a part has
# the same number of rows, in the same order (the part's samples).
Part = dict[str, tuple[Any, np.ndarray]]
EngineKind = Literal["auto", "host", "bound"]


def images_part(block: Any, rows: np.ndarray) -> Part:
    """A part whose samples have their images only (stage 0, or every stage of an image-input cascade)."""
    return {IMAGES: (block, np.asarray(rows))}


@dataclass(frozen=True)
class StageIO:
    """What one stage's graph reads and which of its outputs later stages read. inputs: (graph input, source)
    pairs; carried: (graph output, source name) pairs, the outputs kept for later stages (no other output beyond
    logits is fetched)."""

    inputs: tuple[tuple[str, str], ...]
    carried: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Plan:
    """The tensors a cascade's stages pass along: each stage's StageIO and every source's per-sample shape."""

    stages: tuple[StageIO, ...]
    shapes: dict[str, tuple[int, ...]]

    @classmethod
    def of(cls, manifest: Manifest) -> Plan:
        read = {i.source for stage in manifest.stages for i in stage.inputs}
        stages = []
        for stage in manifest.stages:
            carried = tuple((o.name, f"{stage.name}.{o.name}") for o in stage.outputs
                            if f"{stage.name}.{o.name}" in read)
            stages.append(StageIO(tuple((i.name, i.source) for i in stage.inputs), carried))
        shapes = {IMAGES: manifest.source_shape(IMAGES)}
        shapes.update({src: manifest.source_shape(src) for io in stages for _, src in io.carried})
        return cls(tuple(stages), shapes)

    def read_after(self, stage: int) -> set[str]:
        """Sources some stage after `stage` reads: what a sample that survives `stage` must keep."""
        return {src for io in self.stages[stage + 1:] for _, src in io.inputs}

    @property
    def carried_sources(self) -> list[str]:
        return [src for io in self.stages for _, src in io.carried]


class StageRun(NamedTuple):
    """A stage's work on a batch: the real rows' logits (float32 [rows, classes]), the padding rows it ran, and
    the blocks holding its carried outputs (source -> block, rows in the batch's order)."""

    logits: np.ndarray
    padding: int
    carried: dict[str, Any]


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
    plan: Plan

    def upload(self, images: np.ndarray) -> Any:
        """A block the caller may keep while its rows wait for later stages (the server's stage scheduler)."""
        ...

    def stage_block(self, images: np.ndarray) -> Any:
        """A block valid until the next stage_block call (the runtime's run loop, under the lock)."""
        ...

    def run(self, stage: int, parts: list[Part], keep: bool = False) -> StageRun:
        """Stage `stage` on the parts' rows in order. keep: the carried outputs must outlive later calls (blocks
        of their own); otherwise they are valid until this stage runs again (the caller holds the lock)."""
        ...

    def warm_up(self, batch_sizes: list[int] | None = None) -> None: ...


def _rows_of(parts: list[Part]) -> int:
    return sum(len(next(iter(p.values()))[1]) for p in parts)


class HostEngine:
    kind = "host"
    max_blocks = 1 << 30

    def __init__(self, sessions: list[ort.InferenceSession], plan: Plan):
        self.sessions = sessions
        self.plan = plan
        self.lock = threading.RLock()  # not needed for correctness here; the same interface as BoundEngine

    def upload(self, images: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(images, dtype=np.float32)

    stage_block = upload

    @staticmethod
    def _source(parts: list[Part], source: str) -> np.ndarray:
        if len(parts) == 1:
            block, rows = parts[0][source]
            if len(rows) == len(block) and _is_range(rows):
                return block
        return np.concatenate([p[source][0][p[source][1]] for p in parts])

    def _run(self, stage: int, feeds: dict[str, np.ndarray]) -> StageRun:
        io = self.plan.stages[stage]
        out = self.sessions[stage].run(["logits", *(name for name, _ in io.carried)], feeds)
        return StageRun(out[0], 0, {src: value for (_, src), value in zip(io.carried, out[1:])})

    def run(self, stage: int, parts: list[Part], keep: bool = False) -> StageRun:
        return self._run(stage, {name: self._source(parts, src) for name, src in self.plan.stages[stage].inputs})

    def warm_up(self, batch_sizes: list[int] | None = None) -> None:
        for n in batch_sizes or [1]:
            for s, io in enumerate(self.plan.stages):
                self._run(s, {name: np.zeros((n, *self.plan.shapes[src]), np.float32) for name, src in io.inputs})


def _is_range(rows: np.ndarray) -> bool:
    return len(rows) == 0 or (rows[0] == 0 and rows[-1] == len(rows) - 1 and bool(np.all(np.diff(rows) == 1)))


def _whole(located: list[tuple[Any, np.ndarray]], rows: int) -> Any:
    """The block, when a source's rows are one whole block in order (nothing to gather); else None."""
    if len(located) == 1 and located[0][0].rows == rows and _is_range(located[0][1]):
        return located[0][0]
    return None


@dataclass(eq=False)
class DeviceBlock:
    """A source's rows on the device: a block of its own (value set: uploaded images, or a kept copy of a carried
    output), or one of the engine's fixed buffers (value None: `buffer` is "staging" (the staging buffer of
    `bucket`) or a carried source's output buffer, valid until it is written again)."""
    rows: int  # real rows; the rest of the bucket is padding
    bucket: int
    value: ort.OrtValue | None = None
    buffer: str = "staging"


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

    def __init__(self, sessions: list[ort.InferenceSession], device: Device, plan: Plan, num_classes: int, *,
                 buckets, graphs: bool, max_blocks: int):
        self.sessions = sessions
        self.plan = plan
        self.device_name = "cuda" if device.cuda else "cpu"
        self.input_shape = plan.shapes[IMAGES]
        self.num_classes = num_classes
        self.buckets = Buckets(buckets)
        self.graphs = graphs
        self.max_blocks = max_blocks
        self.lock = threading.RLock()
        largest = self.buckets.largest
        read = {src for io in plan.stages for _, src in io.inputs}
        # Buffers allocated once: their addresses are what captured graphs read and write.
        self.staging = {b: self._zeros((b, *self.input_shape), np.float32) for b in self.buckets.sizes}
        self.gathered = {src: self._zeros((largest, *plan.shapes[src]), np.float32) for src in sorted(read)}
        self.indices = {src: self._zeros((largest,), np.int64) for src in sorted(read)}
        self.carried = {src: self._zeros((largest, *plan.shapes[src]), np.float32) for src in plan.carried_sources}
        self.outputs = [self._zeros((largest, num_classes), np.float32) for _ in sessions]
        self._host_indices = np.zeros(largest, np.int64)
        shapes = {plan.shapes[src] for src in read | set(plan.carried_sources)}
        captured, plain = device.with_cuda_graphs(graphs), device.with_cuda_graphs(False)
        self.gather_one = {shape: captured.session(gather_model(1, shape), len(sessions)) for shape in shapes}
        self.gather_many = {shape: plain.session(gather_model(max_blocks, shape), len(sessions)) for shape in shapes}
        self.empty = {shape: self._zeros((0, *shape), np.float32) for shape in shapes}
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
              outputs: list[tuple[str, ort.OrtValue, int]]) -> _Call:
        call = self._calls.get(key)
        if call is None:
            binding = session.io_binding()
            for name, value, rows in inputs:
                self._bind(binding, name, value, rows, output=False)
            for name, value, rows in outputs:
                self._bind(binding, name, value, rows, output=True)
            options = ort.RunOptions()
            if self.graphs:
                graph_id = self._next_graph_id.get(id(session), 1)  # 0 is reserved by onnxruntime
                self._next_graph_id[id(session)] = graph_id + 1
                options.add_run_config_entry("gpu_graph_id", str(graph_id))
            call = self._calls[key] = _Call(binding, options)
        return call

    def _run_call(self, key: tuple, session, inputs, outputs) -> _Call:
        call = self._call(key, session, inputs, outputs)
        session.run_with_iobinding(call.binding, call.options)
        call.calls += 1
        return call

    def stats(self) -> BoundStats:
        buffers = {f"staging{b}": v.data_ptr() for b, v in self.staging.items()}
        buffers.update({f"gathered:{src}": v.data_ptr() for src, v in self.gathered.items()})
        buffers.update({f"indices:{src}": v.data_ptr() for src, v in self.indices.items()})
        buffers.update({f"carried:{src}": v.data_ptr() for src, v in self.carried.items()})
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

    def _fixed(self, block: DeviceBlock) -> ort.OrtValue:
        return self.staging[block.bucket] if block.buffer == "staging" else self.carried[block.buffer]

    # --- running ---------------------------------------------------------------------------------------------
    def _stage(self, stage: int, inputs: tuple[tuple[str, str], ...], size: int) -> None:
        """Stage on `size` rows of fixed buffers; its logits and carried outputs go to their fixed buffers.
        inputs: (graph input, buffer) pairs, a buffer being "gathered:SOURCE", "staging" or a carried source."""
        bound = []
        for name, buffer in inputs:
            if buffer.startswith("gathered:"):
                value = self.gathered[buffer.removeprefix("gathered:")]
            else:
                value = self.staging[size] if buffer == "staging" else self.carried[buffer]
            bound.append((name, value, size))
        outputs = [("logits", self.outputs[stage], size)]
        outputs += [(name, self.carried[src], size) for name, src in self.plan.stages[stage].carried]
        self._run_call(("stage", stage, inputs, size), self.sessions[stage], bound, outputs)

    def _gather_fixed(self, source: str, block: DeviceBlock, rows: np.ndarray, size: int) -> None:
        """Rows of a fixed buffer -> the first `size` rows of gathered[source] (a captured graph per pair of
        sizes)."""
        self._host_indices[:size] = gather_indices([(0, rows)], size)
        self.indices[source].update_inplace(self._host_indices)
        shape = self.plan.shapes[source]
        self._run_call(("gather", source, block.buffer, block.bucket, size), self.gather_one[shape],
                       [("b0", self._fixed(block), block.bucket), ("indices", self.indices[source], size)],
                       [("images", self.gathered[source], size)])

    def _gather_many(self, shape: tuple[int, ...], parts: list[tuple[DeviceBlock, np.ndarray]], size: int,
                     out: ort.OrtValue) -> None:
        """Rows of blocks of their own (or of one fixed buffer) -> the first `size` rows of `out` (not captured:
        the blocks change from batch to batch)."""
        offsets: dict[int, int] = {}
        blocks: list[DeviceBlock] = []
        for block, _ in parts:
            if id(block) not in offsets:
                offsets[id(block)] = sum(b.bucket for b in blocks)
                blocks.append(block)
        if len(blocks) > self.max_blocks:
            raise RuntimeError(f"a stage batch may gather from at most {self.max_blocks} blocks, got {len(blocks)}")
        indices = gather_indices([(offsets[id(block)], rows) for block, rows in parts], size)
        session = self.gather_many[shape]
        binding = session.io_binding()
        for i in range(self.max_blocks):
            if i < len(blocks):
                b = blocks[i]
                if b.value is None:
                    self._bind(binding, f"b{i}", self._fixed(b), b.bucket, output=False)
                else:
                    binding.bind_ortvalue_input(f"b{i}", b.value)
            else:
                binding.bind_ortvalue_input(f"b{i}", self.empty[shape])
        binding.bind_cpu_input("indices", indices)
        self._bind(binding, "images", out, size, output=True)
        session.run_with_iobinding(binding)

    def _keep(self, source: str, rows: int, size: int) -> DeviceBlock:
        """A carried output's rows, copied from its fixed buffer into a block of its own."""
        shape = self.plan.shapes[source]
        value = ort.OrtValue.ortvalue_from_shape_and_type([size, *shape], np.float32, self.device_name, 0)
        fixed = DeviceBlock(size, size, None, source)
        self._gather_many(shape, [(fixed, np.arange(size))], size, value)
        return DeviceBlock(rows, size, value, source)

    def run(self, stage: int, parts: list[Part], keep: bool = False) -> StageRun:
        io = self.plan.stages[stage]
        rows = _rows_of(parts)
        with self.lock:
            sources = {src: [p[src] for p in parts] for _, src in io.inputs}
            whole = {name: _whole(sources[src], rows) for name, src in io.inputs}
            blocks = list(whole.values())
            one_bucket = all(blocks) and len({b.bucket for b in blocks}) == 1
            if one_bucket and all(b.value is None for b in blocks):
                # every input a whole fixed buffer (stage 0 on the staging buffer, or all survived): in place
                size = blocks[0].bucket
                self._stage(stage, tuple((name, block.buffer) for name, block in whole.items()), size)
            elif one_bucket and not self.graphs and all(b.value is not None for b in blocks):
                size = blocks[0].bucket
                self._direct(stage, whole, size)  # whole blocks of their own, no graphs to keep: no copy
            else:
                size = self.buckets.size(rows)
                for name, src in io.inputs:
                    located = sources[src]
                    fixed = [block for block, _ in located if block.value is None]
                    if fixed and (len(fixed) < len(located) or any(b is not fixed[0] for b in fixed)):
                        raise ValueError("a staged block cannot be mixed with other blocks")
                    if fixed:
                        picked = located[0][1] if len(located) == 1 else np.concatenate([r for _, r in located])
                        self._gather_fixed(src, fixed[0], picked, size)
                    else:
                        self._gather_many(self.plan.shapes[src], located, size, self.gathered[src])
                self._stage(stage, tuple((name, f"gathered:{src}") for name, src in io.inputs), size)
            # Only the logits come back to the host (the whole fixed buffer: [largest, classes], a few KB).
            logits = np.array(self.outputs[stage].numpy()[:rows])
            carried = {src: self._keep(src, rows, size) if keep else DeviceBlock(rows, size, None, src)
                       for _, src in io.carried}
            return StageRun(logits, size - rows, carried)

    def _direct(self, stage: int, blocks: dict[str, DeviceBlock], size: int) -> None:
        """Stage on whole blocks of their own (graph input -> block), bound as they are (not a prepared call)."""
        session = self.sessions[stage]
        binding = session.io_binding()
        for name, block in blocks.items():
            binding.bind_ortvalue_input(name, block.value)
        self._bind(binding, "logits", self.outputs[stage], size, output=True)
        for name, src in self.plan.stages[stage].carried:
            self._bind(binding, name, self.carried[src], size, output=True)
        session.run_with_iobinding(binding)

    def warm_up(self, batch_sizes: list[int] | None = None) -> None:
        """Every prepared call, three times: every stage at every bucket on its fixed buffers in place and from
        the gathered buffers, every gather from a fixed buffer of one bucket into one no larger, the uploaded-block
        gathers and the copies of carried outputs at every size. onnxruntime captures a graph after its warm-up
        runs, so serving never captures, and cuDNN never meets a new shape. batch_sizes: ignored (every bucket is
        warmed)."""
        with self.lock:
            for size in self.buckets.sizes:
                images = np.zeros((size, *self.input_shape), np.float32)
                uploaded = {src: DeviceBlock(size, size, self._zeros((size, *shape), np.float32), src)
                            for src, shape in self.plan.shapes.items()}
                for _ in range(3):
                    where: Part = {IMAGES: (self.stage_block(images), np.arange(size))}
                    for s in range(len(self.sessions)):
                        run = self.run(s, [where])  # in place
                        where.update({src: (block, np.arange(size)) for src, block in run.carried.items()})
                    for src, (block, _) in where.items():  # the images and every carried output
                        for smaller in self.buckets.sizes:
                            if smaller <= size:
                                self._gather_fixed(src, block, np.arange(smaller), smaller)
                    for src in self.gathered:
                        self._gather_many(self.plan.shapes[src], [(uploaded[src], np.arange(size))], size,
                                          self.gathered[src])
                    for s, io in enumerate(self.plan.stages):
                        self._stage(s, tuple((name, f"gathered:{src}") for name, src in io.inputs), size)
                        for _, src in io.carried:
                            self._keep(src, size, size)


def make_engine(spec: EngineSpec, device: Device, sessions: list[ort.InferenceSession], plan: Plan,
                num_classes: int) -> HostEngine | BoundEngine:
    if spec.kind == "host":
        return HostEngine(sessions, plan)
    return BoundEngine(sessions, device, plan, num_classes, buckets=spec.buckets, graphs=bool(spec.graphs),
                       max_blocks=spec.max_blocks)
