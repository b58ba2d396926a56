"""The model side, pure torch + peft: base models, the PHATGOOSE router, routed layers, baselines."""
