"""Qwen2-VL (2B, 7B): transformers' ``Qwen2VLForConditionalGeneration`` as a family of the platform.

Only what differs from the other transformers-native families lives here: the presets (``presets.py``), the
official chat template (``chat_template.py``) and the spec (``family.py``); the machinery is ``hf_vl``.
"""
