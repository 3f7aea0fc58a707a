"""kdship: offline knowledge distillation for LLMs.

Data flows one way: ``cache`` (teacher -> Zarr store) -> ``train`` (store -> student checkpoint)
-> ``export`` (checkpoint -> HF / ONNX) -> ``serve`` / ``profile`` -> ``eval``.
"""

__version__ = "0.1.0"
