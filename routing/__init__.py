"""The model side, pure torch + peft: base models, gates, the PHATGOOSE router, baselines."""

# The router's public names, imported on first use so `import routing.base` stays light.
_ROUTER_EXPORTS = {
    "route": "routing.router", "unroute": "routing.router",
    "routing_inputs": "routing.router", "stack_experts": "routing.stack",
    "RouterWeights": "routing.stack", "save_router": "routing.version",
    "load_router": "routing.version", "capture_routing": "routing.trace",
    "plot_usage": "routing.trace",
}


def __getattr__(name: str):
    if name in _ROUTER_EXPORTS:
        import importlib

        return getattr(importlib.import_module(_ROUTER_EXPORTS[name]), name)
    raise AttributeError(f"module 'routing' has no attribute {name!r}")
