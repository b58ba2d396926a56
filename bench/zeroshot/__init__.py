"""Zero-shot benchmark: PHATGOOSE against its baselines on real tasks, through the real system."""
