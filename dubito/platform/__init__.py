"""The shared uncertainty service: models, heads, losses, the MC engine, the decomposition,
tracking and plots. ``platform`` never imports the other parts of dubito."""
