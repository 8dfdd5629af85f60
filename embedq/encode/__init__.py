"""Encoding: the ``Encoder`` seam, backend-neutral tokenizing and device helpers, the torch
and int8 ONNX backends, and the factory that picks one from the settings."""
