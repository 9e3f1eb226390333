"""docs/kvm-rules.md is generated from the rule tests and must not drift from them."""

from __future__ import annotations

from tools import gen_kvm_rules as gen


def test_kvm_rules_md_is_up_to_date() -> None:
    """The committed matrix equals what tools/gen_kvm_rules.py makes from the tests now
    (run it to refresh the file)."""
    found = gen.collect()
    assert gen.OUT.read_text() == gen.render(found), "run: .venv/bin/python tools/gen_kvm_rules.py"


def test_every_rule_has_a_row_and_every_modelled_rule_a_test() -> None:
    """R1.1-R9.6 and R3.5 each have a row; a rule marked faithful or different has at
    least one test (its own, or those of the rules it points at); tests name no rule
    the matrix lacks."""
    expected = {
        f"R{major}.{minor}"
        for major, count in {1: 7, 2: 5, 3: 5, 4: 10, 5: 6, 6: 6, 7: 6, 8: 11, 9: 6}.items()
        for minor in range(1, count + 1)
    }
    assert set(gen.RULES) == expected
    assert gen.problems(gen.collect()) == []
