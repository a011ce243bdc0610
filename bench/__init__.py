"""Benchmarks, the model factory and the ComfyUI environment shared by tests, demo and benchmarks."""
