"""Folders written by SAELens and sparsify load as sae_guard SAEs with the same codes.

The fixtures were made by the libraries themselves (tests/fixtures/make_interop_fixtures.py, run in
the peer venv); each holds an input `x`, the library's own codes for it, and its reconstruction.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_guard import SAE

FIXTURES = Path(__file__).parent / "fixtures" / "interop"
EXPECTED = {
    "saelens_topk": "topk", "saelens_topk_rescaled": "topk", "saelens_jumprelu": "jumprelu",
    "saelens_standard": "relu", "sparsify_topk": "topk",
}


@pytest.mark.parametrize("folder", sorted(EXPECTED))
def test_same_codes_as_the_library_that_wrote_it(folder):
    sae = SAE.load(FIXTURES / folder)
    assert sae.architecture == EXPECTED[folder]
    ref = load_file(str(FIXTURES / folder / "reference.safetensors"))
    codes = sae.encode(ref["x"])
    assert (codes - ref["codes"]).abs().max().item() <= 1e-4
    assert torch.equal(codes != 0, ref["codes"] != 0)
    assert (sae(ref["x"]) - ref["recon"]).abs().max().item() <= 1e-4


def test_converted_folder_roundtrips_in_our_format(tmp_path):
    sae = SAE.load(FIXTURES / "saelens_topk_rescaled")
    sae.save(tmp_path / "ours")
    ref = load_file(str(FIXTURES / "saelens_topk_rescaled" / "reference.safetensors"))
    torch.testing.assert_close(SAE.load(tmp_path / "ours").encode(ref["x"]), sae.encode(ref["x"]), atol=0, rtol=0)
