"""What the transformers-native Qwen VL families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) have in common.

Each of those families is ``HFVisionLanguageFamily`` (``family.py``) parameterised by a small ``FamilySpec``
(``spec.py``): the transformers class names, presets, special tokens, chat template and processor files. The
per-family sub-packages (``qwenvl_core.models.qwen2_vl`` etc.) hold only their spec. This package owns:

- ``spec.py``        FamilySpec, Preset, SpecialToken: the data a family supplies
- ``config.py``      build a preset's config; read and validate a directory's ``config.json``
- ``tokenizer.py``   the tiny byte-level BPE with the family's real special tokens, in the official file layout
- ``files.py``       chat template, preprocessor, video preprocessor and generation config files
- ``weights.py``     strict loading through transformers (safetensors only, keys listed) and saving
- ``chat.py``        the chat layout turn by turn in token ids (equal to the official template's), message text
- ``processor.py``   HFVLProcessor, the families' FamilyProcessor, on the transformers processor of a directory
- ``materialize.py`` a complete random model directory from a preset and a seed
- ``family.py``      the ``ModelFamily`` implementation shared by the three families

Nothing here is imported at package import time (no work at import).
"""
