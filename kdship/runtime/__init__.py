"""Runtimes that several verbs use, imported downward by them: the vLLM engine, ONNX Runtime sessions
and a `kdship serve` child process. No verb package imports another; what they share lives here."""
