"""Parameter-efficient adaptors, one per file, registered by name.

Each adaptor module has a config dataclass, ``apply(model, cfg) -> targeted module names`` and a
parameter-name ``PREFIX`` by which freezing, saving and export select its parameters. Two more
names select no module: ``full`` (full finetuning: every backbone parameter trains except the
frozen CNN front end) and ``none`` (head only: a linear probe).
"""

from dser.model.adaptors import bottleneck, lora, weight_gating, weighted_sum

ADAPTORS = {
    "lora": lora,
    "bottleneck": bottleneck,
    "weighted_sum": weighted_sum,
    "weight_gating": weight_gating,
}
MODES = ("full", "none")
NAMES = tuple(ADAPTORS) + MODES
PREFIXES = {name: module.PREFIX for name, module in ADAPTORS.items()}
FRESH = ("lora", "bottleneck")  # adaptors stage 2 can add as a second, fresh set
