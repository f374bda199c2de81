"""Run directory -> model repository (`reskd export`, `reskd compose`, `reskd calibrate`).

- command.py    `reskd export`: options checked against the run and the repository, versions chosen
- exporter.py   the Exporter: a run's networks -> version folders (graphs, manifest, parity, calibration), written
                through the model repository (reskd.manifest.ModelRepository: one rule for version folders)
- onnx.py       PyTorch network -> ONNX graph (dynamic batch, fp32 or fp16 inside)
- parity.py     ONNX against PyTorch on every validation image: logits, running logits, carried outputs, exits
- calibrate.py  exit thresholds and the operating curve on validation, measured once on test, through the runtime
- runs.py       what an export reads from a run: its validation and test images, input spec, independent cascade
- compose.py    `reskd compose`: a cascade and a one-stage fallback from versions already in a repository
- errors.py     ExportError
"""
