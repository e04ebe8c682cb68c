"""Qwen3-VL dense (2B, 4B, 8B): transformers' ``Qwen3VLForConditionalGeneration`` as a family of the platform.

Only what differs lives here: the presets (``presets.py``: 16 px patches, interleaved M-RoPE, DeepStack), the
official chat template (``chat_template.py``) and the spec (``family.py``); the machinery is ``hf_vl``.
"""
