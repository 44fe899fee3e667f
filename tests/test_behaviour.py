"""The numbers a refactoring must not change, bit for bit (tests/fixtures/behaviour/measure.py says
which). The reference and the model file were written by tests/fixtures/behaviour/record.py before the
package layout changed; a parameter may have been renamed since, so gradients and weights are matched
as multisets of digests, and reported by name where a name still matches."""

import json
from collections import Counter

from tests.fixtures.behaviour.measure import MODEL_FILE, REFERENCE, measure


def _differences(measured: object, reference: object, where: str = "") -> list[str]:
    if isinstance(reference, dict) and isinstance(measured, dict):
        if reference and all(isinstance(v, str) and " float" in v for v in reference.values()):
            return _digest_differences(measured, reference, where)
        found = []
        for key in sorted(reference.keys() | measured.keys()):
            if key not in measured or key not in reference:
                found.append(f"{where}/{key}: {'missing' if key not in measured else 'not in the reference'}")
            else:
                found += _differences(measured[key], reference[key], f"{where}/{key}")
        return found
    if isinstance(reference, list) and isinstance(measured, list) and len(reference) == len(measured):
        return [d for i, (m, r) in enumerate(zip(measured, reference)) for d in _differences(m, r, f"{where}[{i}]")]
    return [] if measured == reference else [f"{where}: {measured!r} != reference {reference!r}"]


def _digest_differences(measured: dict[str, str], reference: dict[str, str], where: str) -> list[str]:
    """Per-tensor digests, compared as multisets (names may change); the mismatches named."""
    if Counter(measured.values()) == Counter(reference.values()):
        return []
    changed = [name for name in reference if measured.get(name, reference[name]) != reference[name]]
    unknown = sorted(set(measured.values()) - set(reference.values()))
    return [f"{where}: {len(unknown)} tensors differ from the reference (by name: {changed[:5]})"]


def test_numbers_are_bit_identical_to_the_reference(tmp_path):
    reference = json.loads(REFERENCE.read_text())
    measured = json.loads(json.dumps(measure(tmp_path, MODEL_FILE)))
    assert _differences(measured, reference) == []
