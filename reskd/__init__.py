"""reskd: train ResKD cascades and serve them with sample-adaptive early exit.

This package is the torch-free core every application stands on (docs/design.md, "Data flow"); the applications
install as its subpackages: reskd.training (training/), reskd.export (export/), reskd.service (service/),
reskd.scoring (scoring/).

- manifest.py     the model repository contract: manifests read and written, version folders, sha256
- runtime.py      CascadeRuntime: a version's stages run with early exit, per-sample settings, operating points
- engine.py       how stages execute: host buffers or device buffers, buckets, gathers, CUDA graphs
- cascade.py      one cascade step: running logits, confidence, exits
- exit_policy.py  the exit rule, threshold search, the operating-point curve
- device.py       onnxruntime providers, threads and session options
- preprocess.py   image bytes -> pixels -> normalised tensors, as the manifest says
- stats.py        paired bootstrap intervals
- machine.py      cores and GPUs this process may use
- files.py        atomic file writes
- validation.py   validation messages that name the field
- cli.py          the `reskd` command
"""

__version__ = "0.1.0"
