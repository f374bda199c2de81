"""Run directory -> model repository: ONNX per stage, parity against PyTorch, calibration through the runtime."""
