"""The runtimes the app drives implement `ChatRuntime` as declared: every member, and every
method with the declared parameters (names, kinds, defaults) first, in order."""
import inspect

import pytest

from app.runtime.engine import Runtime
from app.runtime.protocol import ChatRuntime
from app.runtime.remote import RemoteRuntime
from tests.ui.fake import FakeRuntime


def _members():
    hints = set(getattr(ChatRuntime, "__annotations__", {}))
    methods = {n: v for n, v in vars(ChatRuntime).items()
               if not n.startswith("_") and (inspect.isfunction(v) or isinstance(v, property))}
    return hints, methods


def _params(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("cls", [Runtime, RemoteRuntime, FakeRuntime])
def test_runtime_implements_the_protocol(cls):
    attrs, methods = _members()
    assert {"ask", "set_policy", "load_document", "restore", "memory"} <= set(methods)
    src = "".join(inspect.getsource(c) for c in cls.__mro__ if c is not object)
    for name in attrs:  # instance attributes: set in __init__ (or on the class)
        assert hasattr(cls, name) or f"self.{name}" in src, f"{cls.__name__} lacks `{name}`"
    for name, decl in methods.items():
        impl = inspect.getattr_static(cls, name, None)
        assert impl is not None or f"self.{name} =" in src or f"self.{name}," in src, \
            f"{cls.__name__} lacks `{name}`"
        if isinstance(decl, property) or impl is None or isinstance(impl, property) or not callable(impl):
            continue
        want, got = _params(decl), _params(impl)
        assert got[:len(want)] == want, f"{cls.__name__}.{name}{inspect.signature(impl)} is not {name}" \
                                        f"{inspect.signature(decl)}"
        extra = got[len(want):]
        assert all(p[2] is not inspect.Parameter.empty for p in extra), f"{cls.__name__}.{name}: extra " \
                                                                        "parameters must have defaults"


def test_a_runtime_missing_a_method_fails_the_check():
    class Broken(FakeRuntime):
        def ask(self, question, max_new_tokens=1024):  # keyword-only lost, parameters missing
            return None
    with pytest.raises(AssertionError, match="Broken.ask"):
        test_runtime_implements_the_protocol(Broken)
