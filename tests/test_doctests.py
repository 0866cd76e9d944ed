"""The examples in docstrings run."""

import doctest

import pytest

import nnshrink
from nnshrink.techniques import sparsity


@pytest.mark.parametrize("module", [nnshrink, sparsity], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
