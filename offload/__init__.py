"""Host tier and label-cache policies: `offload` (spill with recall, or a host store) and
`doublesparse` (sparse decode). `policies.registry.MODULES` lists this package: importing
`policies` imports it, and it registers them.

`offload` has one name and two roles. It registers in the spill slot with a `place`
rule (policies/registry.py): behind an evicting selector (any selector but `full`) it is
the spill that keeps evicted tokens on the host and recalls them; otherwise it moves to
the store slot and holds the whole cache on the host, streamed per layer. The parser
decides once, so `offload+kivi` (two stores) is refused by name, as any clash is.
"""
from policies import Opt, SpecError, register

from .doublesparse import DoubleSparseReader
from .host import HostStore
from .spill import QUOTE_MIN, OffloadSpill, quote_span

_RECALL_OPTS = ("recall", "channels", "every", "pool", "quote", "terms", "rank", "channels_file", "kbits", "vbits")


def _place(slots) -> str:
    sel = slots.get("selector")
    if sel is not None and sel.name != "full":
        return "spill"
    pol = next(p for p in slots.values() if p.name == "offload")
    from policies import REGISTRY
    opts = REGISTRY["offload"].options
    changed = [k for k in _RECALL_OPTS if pol.opts[k] != opts[k].default]
    if changed:
        raise SpecError(f"option `{changed[0]}` of policy `offload` applies only behind an evicting "
                        "selector (e.g. locret+offload); `offload` alone keeps every token on the host")
    return "store"


def _check_offload(opts) -> None:
    span = quote_span(opts["recall"], opts["quote"])
    if (opts["terms"] or not opts["rank"]) and span < QUOTE_MIN:
        why = (f"`quote` ({opts['quote']}) must be {QUOTE_MIN} or more" if opts["quote"] < QUOTE_MIN else
               f"quote spans take at most half of `recall` ({opts['recall']}): {span} tokens; `recall` must be "
               f"{2 * QUOTE_MIN} or more")
        raise SpecError(f"policy `offload`: options `terms` and `rank=off` work through quote spans; {why}")
    if opts["pool"] % 2 == 0:
        raise SpecError(f"option `pool` of policy `offload`: {opts['pool']} must be odd (a window centred "
                        "on each token)")


@register("offload", "spill", {
    "recall": Opt(int, 512, "evicted tokens brought back per KV head before answering", min=1),
    "channels": Opt(int, 16, "label channels r per KV head (calibrated)", min=1),
    "every": Opt(int, 0, "re-recall every N decode steps (0: only before answering)", min=0),
    "pool": Opt(int, 1, "recall spans: a host token scores the max within pool//2 of it in the text (odd)",
                min=1),
    "quote": Opt(int, 128, "tokens recalled in every head around text the question or answer repeats "
                 "verbatim (at most recall/2; under 16: off)", min=0),
    "terms": Opt(bool, False, "quote spans also around the question's rare word pairs (the words "
                 "that name a fact; needs quote)"),
    "rank": Opt(bool, True, "on: the label ranking fills the recall buffer beside the spans; off: spans only"),
    "channels_file": Opt("path", "", "calibration file (default: the one shipped for this model)"),
    "kbits": Opt(int, 16, "bits per evicted key on the host: 2, 4 or 8 (KIVI codes, per channel), 16 the "
                 "cache's own precision", choices=(2, 4, 8, 16)),
    "vbits": Opt(int, 16, "bits per evicted value on the host: 2, 4 or 8 (KIVI codes, per token), 16 the "
                 "cache's own precision", choices=(2, 4, 8, 16)),
}, "host tier: alone, the whole cache in host memory streamed per layer; behind an evicting "
   "selector, evicted tokens go to the host and the best ones are recalled per question", place=_place,
   check=_check_offload)
def build_offload(policy, info, layer):
    if policy.slot == "store":
        return HostStore(info, layer)
    o = policy.opts
    return OffloadSpill(info, layer, o["recall"], o["channels"], o["every"], o["channels_file"], o["pool"],
                        o["quote"], o["terms"], o["rank"], o["kbits"], o["vbits"])


def _check_ds(opts) -> None:
    if opts["keep"] <= 0:
        raise SpecError(f"option `keep` of policy `doublesparse`: {opts['keep']:g} must be above 0")


@register("doublesparse", "reader", {
    "channels": Opt(int, 16, "label channels r per KV head (calibrated)", min=1),
    "keep": Opt("fraction", 1 / 16, "fraction of cached tokens each decode step reads", min=0.0, max=1.0),
    "dense_layers": Opt(int, 2, "first layers that always attend densely", min=0),
    "floor": Opt(int, 0, "read at least this many tokens per step", min=0),
    "channels_file": Opt("path", "", "calibration file (default: the one shipped for this model)"),
}, "sparse decode: a label cache picks the top keep-fraction of tokens per head (Double Sparsity)",
    check=_check_ds)
def build_doublesparse(policy, info, layer):
    o = policy.opts
    return DoubleSparseReader(info, layer, o["channels"], o["keep"], o["dense_layers"], o["floor"],
                              o["channels_file"])
