"""The exemplar model (the default): its bank, networks, trainer and folded serving graph."""
