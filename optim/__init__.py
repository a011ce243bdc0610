"""Implementations of the pack's techniques. Importable without ComfyUI: anything from ComfyUI is
imported inside the functions that need it."""
