"""The stream processors: decoding/validation, dead-lettering, user state, the Faust worker."""
