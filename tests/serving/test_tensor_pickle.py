"""Messages pickled with their tensors by value (``tensor_pickle``): what a replica sends its engine's process."""

from __future__ import annotations

import pickle
import pickletools
import warnings

import pytest
import torch

from qwenvl_core.models.processing import VisionInputs
from qwenvl_core.serving import tensor_pickle


@pytest.mark.parametrize("tensor", [
    torch.randn(3, 4, 5),
    torch.randn(4, 6).t(),  # not contiguous
    torch.randn(2, 3).to(torch.bfloat16),
    torch.tensor([[1, 2, 3]], dtype=torch.long),
    torch.tensor([True, False]),
    torch.tensor(2.5),  # 0-dim
    torch.empty(0, 1176),
], ids=["float32", "transposed", "bfloat16", "int64", "bool", "scalar", "empty"])
def test_tensors_come_back_equal_in_dtype_shape_and_value(tensor):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it wraps a read-only buffer: the bytes come writable
        back = pickle.loads(tensor_pickle.dumps({"x": [tensor]}))["x"][0]
    assert back.dtype == tensor.dtype and back.shape == tensor.shape and torch.equal(back, tensor)


def test_a_prepared_requests_pixels_are_read_back_without_torch_load():
    vision = VisionInputs({"pixel_values": torch.randn(16, 1176), "image_grid_thw": torch.tensor([[1, 4, 4]])}, 1)
    data = tensor_pickle.dumps(("submit", 3, vision))
    strings = {arg for _op, arg, _pos in pickletools.genops(data) if isinstance(arg, str)}
    assert "tensor_from_bytes" in strings  # the only way a tensor is rebuilt: torch's own pickling is not used
    assert not {"_load_from_bytes", "_rebuild_tensor_v2", "_rebuild_tensor"} & strings
    kind, rid, back = pickle.loads(data)
    assert (kind, rid, back.n_images) == ("submit", 3, 1)
    assert all(torch.equal(back.tensors[k], vision.tensors[k]) for k in vision.tensors)


def test_a_tensor_off_the_cpu_is_refused_and_a_forged_dtype_is_not_read():
    with pytest.raises(ValueError, match="only CPU tensors"):
        tensor_pickle.dumps(torch.empty(2, device="meta"))
    with pytest.raises(ValueError, match="not a torch dtype"):
        tensor_pickle.tensor_from_bytes("load", (1,), bytearray(4))
