"""Using a trained model: resolving a model name, loading, prediction, benchmarking, ONNX export."""
