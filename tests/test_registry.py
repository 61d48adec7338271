"""The spec parser: valid specs build; anything else is one SpecError naming the bad part."""
import pytest
from hypothesis import given, settings, strategies as st

import offload  # noqa: F401  (registers its policies)
from policies import REGISTRY, SpecError, parse_spec
from policies.registry import Opt


def test_full_parses():
    slots = parse_spec("full")
    assert list(slots) == ["selector"] and slots["selector"].name == "full"


@pytest.mark.parametrize("spec,needle", [
    ("", "empty policy spec"),
    ("nope", "unknown policy `nope`"),
    ("full+full", "both decide the cache's selector"),
    ("full:budget=3", "has no option `budget`"),
    ("full:", None),
    ("full+", "empty policy name"),
    (":x=1", "empty policy name"),
])
def test_bad_specs_name_the_part(spec, needle):
    if needle is None:
        parse_spec(spec)  # a trailing colon with no options is allowed
        return
    with pytest.raises(SpecError, match=needle.replace("(", r"\(").replace("+", r"\+")):
        parse_spec(spec)


@pytest.mark.parametrize("kind,raw,ok", [
    (int, "12", 12), (int, "1.5", None), (int, "", None), (float, "0.5", 0.5), (float, "nan", None),
    ("fraction", "1/16", 0.0625), ("fraction", "1/0", None), ("fraction", "0.25", 0.25),
    (bool, "yes", True), (bool, "off", False), (bool, "maybe", None), (str, "", None),
])
def test_option_kinds(kind, raw, ok):
    opt = Opt(kind, None)
    if ok is None:
        with pytest.raises(SpecError, match="option `k` of policy `p`"):
            opt.parse("p", "k", raw)
    else:
        assert opt.parse("p", "k", raw) == ok


def test_option_ranges_and_choices():
    with pytest.raises(SpecError, match="below the minimum 16"):
        Opt(int, 32, min=16).parse("p", "budget", "8")
    with pytest.raises(SpecError, match="above the maximum 8"):
        Opt(int, 2, max=8).parse("p", "bits", "9")
    with pytest.raises(SpecError, match="not one of 2, 4"):
        Opt(int, 2, choices=(2, 4)).parse("p", "bits", "3")


_names = st.sampled_from(sorted(REGISTRY) + ["bogus", "", "full "])
_opt = st.tuples(st.text("abcdefghijklmnopqrstuvwxyz_", max_size=12),
                 st.one_of(st.integers(-5, 70000).map(str), st.text(max_size=6), st.just("1/16")))
_part = st.tuples(_names, st.lists(_opt, max_size=3)).map(
    lambda t: t[0] + ((":" + ",".join(f"{k}={v}" for k, v in t[1])) if t[1] else ""))


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.lists(_part, min_size=1, max_size=4).map("+".join), st.text(max_size=40)))
def test_any_string_parses_or_raises_one_clear_error(spec):
    try:
        slots = parse_spec(spec)
    except SpecError as e:
        assert str(e) and "\n" not in str(e)
        return
    # It parsed: every option it names was really applied (none silently ignored).
    for part in spec.split("+"):
        name, _, rest = part.partition(":")
        pol = next(p for p in slots.values() if p.name == name.strip())
        for item in filter(None, (i.strip() for i in rest.split(","))):
            key, _, raw = item.partition("=")
            assert key.strip() in pol.opts
            assert pol.opts[key.strip()] == REGISTRY[pol.name].options[key.strip()].parse(pol.name, key.strip(), raw)


def test_every_registered_policy_has_a_summary_and_valid_defaults():
    for name, entry in REGISTRY.items():
        assert entry.summary, name
        for key, opt in entry.options.items():
            if opt.default not in (None, ""):
                assert opt.parse(name, key, str(opt.default)) == opt.default, (name, key)
