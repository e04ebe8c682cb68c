"""qwenvl_core: the Qwen-VL model library (architecture, tokenizer, processor, data, training, generation).

Pure library: no Ray, no HTTP, no work at import time. ``service`` and ``workflows`` build on it; it imports
nothing from them.
"""
