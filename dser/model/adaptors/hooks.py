"""What the hook-based adaptors share: the layers a ``layers`` setting selects, and hooks that pass
a module's output or input through an adaptor module.

    layers = selected_layers(cfg.layers, model.backbone, "model.bottleneck.layers")
    rewrite_output(model, backbone.ffn_module(i), adapter)     # y ← adapter(y)
    rewrite_input(model, layer.fc2, vector)                    # fc2(x) ← fc2(vector(x))

The adaptor module is *called* in the hook (never its weights read directly), so ZeRO-3 gathers
its parameters. Outputs may be a tensor or a tuple led by one (a transformer layer's
``(hidden, position_bias)``); the first element is rewritten. Hooks are ``OutputHook`` /
``InputHook`` objects that keep the adaptor module as ``fn``, so code that needs to know what a
hook does (IA³'s merge and peft export) finds it on the hooked module. Every handle goes to
``model.hook_handles``.
"""

from __future__ import annotations

from dser.config import ConfigError


def selected_layers(layers: list[int] | None, backbone, key: str) -> list[int]:
    """The transformer layers an adaptor's ``layers`` setting selects, in order.

    Args:
        layers: 0-based indices, or None for every layer.
        backbone: the ``Backbone``.
        key: the config key, for the error (``model.lora.layers``).

    Raises:
        ConfigError: an index out of range, naming the key and the backbone's range.
    """
    bad = [i for i in layers or [] if not 0 <= i < backbone.num_layers]
    if bad:
        raise ConfigError(f"{key}: {bad} outside 0..{backbone.num_layers - 1} ({backbone.family})")
    return sorted(set(layers)) if layers is not None else list(range(backbone.num_layers))


class OutputHook:
    """A forward hook: the module's output (or its first element) becomes ``fn(output)``."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, _module, _inputs, output):
        if isinstance(output, tuple):
            return (self.fn(output[0]),) + tuple(output[1:])
        return self.fn(output)


class InputHook:
    """A forward pre-hook: the module's first input becomes ``fn(input)``."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, _module, args, kwargs):
        if args:
            return (self.fn(args[0]),) + tuple(args[1:]), kwargs
        name = next(iter(kwargs))  # called with keywords only, e.g. linear(input=x)
        return args, {**kwargs, name: self.fn(kwargs[name])}


def rewrite_output(model, target, fn) -> None:
    """Pass ``target``'s output through ``fn`` (an ``nn.Module``), as a hook kept in ``model.hook_handles``."""
    model.hook_handles.append(target.register_forward_hook(OutputHook(fn)))


def rewrite_input(model, target, fn) -> None:
    """Pass ``target``'s input through ``fn`` before it runs, as a pre-hook kept in ``model.hook_handles``."""
    model.hook_handles.append(target.register_forward_pre_hook(InputHook(fn), with_kwargs=True))
