"""The model side, pure torch + peft: base models, gates, the PHATGOOSE router, baselines."""
