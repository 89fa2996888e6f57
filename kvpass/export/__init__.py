"""Engines made from a transformed model: ONNX (run by onnxruntime) and TensorRT."""
