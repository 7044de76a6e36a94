"""SavedModel export, embedding publishing and the version registry."""
