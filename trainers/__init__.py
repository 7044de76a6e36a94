"""Ray trainer actors, the CTR model and its embedding tables."""
