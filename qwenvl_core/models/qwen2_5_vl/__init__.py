"""Qwen2.5-VL (3B, 7B): transformers' ``Qwen2_5_VLForConditionalGeneration`` as a family of the platform.

Only what differs lives here: the presets (``presets.py``) and the spec (``family.py``: the Qwen2.5 tokenizer's
extra tokens, window-attention ViT); the chat template is Qwen2-VL's, the machinery is ``hf_vl``.
"""
