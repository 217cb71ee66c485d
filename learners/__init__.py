"""Models: bandit policies, river incremental models, off-policy estimators (steps 2-3)."""
