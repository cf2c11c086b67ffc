"""docs/API.md is generated from the code: it must be current, and every public item documented."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import gen_api_docs  # noqa: E402


def test_every_public_class_function_and_method_has_a_docstring():
    assert gen_api_docs.missing_docstrings() == []


def test_api_reference_is_current():
    expected = gen_api_docs.render()
    assert gen_api_docs.OUT.read_text() == expected, "run: python scripts/gen_api_docs.py"


def test_signatures_read_as_written_and_config_fields_carry_their_docstrings():
    from coars_agents.coars import CoARSConfig

    text = gen_api_docs.render()
    assert "### `make(env_id: str, split: str = 'test'" in text
    docs = gen_api_docs.field_docs(CoARSConfig)
    assert docs["max_grad_norm"] == "Gradient clipping per adapter (0 disables)."
    assert (
        "| `max_grad_norm` | `float` | `1.0` | Gradient clipping per adapter (0 disables). |"
        in text
    )
