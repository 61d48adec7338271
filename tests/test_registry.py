"""The spec parser: valid specs build; anything else is one SpecError naming the bad part."""
import pytest
from hypothesis import given, settings, strategies as st

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


@pytest.mark.parametrize("spec,canonical", [
    ("full", "full"),
    ("full+kivi", "kivi"),
    ("kivi+locret", "locret+kivi"),  # slots in order, whatever order they were written in
    ("ffnskip+kivi+locret:budget=1024", "locret+kivi+ffnskip"),  # defaults are not written
    ("h2o+offload:rank=false,terms=true", "h2o+offload:terms=on,rank=off"),  # an old spelling; bools on/off
    ("streaming:window=128+offload:terms=yes,rank=0,quote=32,recall=64",
     "streaming:window=128+offload:recall=64,quote=32,terms=on,rank=off"),  # options in registered order
    ("doublesparse:keep=1/8", "doublesparse:keep=0.125"),
    ("doublesparse:keep=1/3", "doublesparse:keep=0.3333333333333333"),  # reads back the same value
])
def test_one_canonical_form(spec, canonical):
    from policies import KVCache
    from policies.registry import canonical_spec
    from test_base import _info
    assert canonical_spec(spec) == canonical
    assert canonical_spec(canonical) == canonical  # a fixed point: comparing canonical forms is stable
    if "locret" not in spec and "doublesparse" not in spec and "ffnskip" not in spec:  # need no files
        assert KVCache(spec, _info(d=32)).spec == canonical  # the live cache shows the same string


def test_every_registered_policy_canonical_form_reads_back():
    from policies.registry import canonical_spec
    for name, entry in REGISTRY.items():
        for key, opt in entry.options.items():
            if opt.kind is bool:
                spec = f"h2o+{name}:{key}={'off' if opt.default else 'on'}" if name == "offload" else \
                    f"{name}:{key}={'off' if opt.default else 'on'}"
                assert canonical_spec(spec) == spec, spec
