"""peft's calls into ``transformers`` that transformers deprecates: silenced around our peft calls only.

peft 0.21 reads ``model.is_gradient_checkpointing`` whenever it wraps or loads a model (``PeftModel.__init__``),
and transformers 5.x deprecates that property for ``is_activation_checkpointing`` with a ``FutureWarning``: every
training worker and every merge logged it, about code that is neither ours nor the user's. Only that warning, and
only inside ``quiet_peft()``, is dropped; any other warning still shows.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

PEFT_DEPRECATIONS = (r"`is_gradient_checkpointing` is deprecated",)


@contextmanager
def quiet_peft() -> Iterator[None]:
    """Run peft calls without transformers' deprecation warnings about peft's own attribute reads."""
    with warnings.catch_warnings():
        for message in PEFT_DEPRECATIONS:
            warnings.filterwarnings("ignore", message=message, category=FutureWarning)
        yield
