"""evaluation: how much of a profile survives generation. evaluate runs the steps; compare,
classify, report and charts hold what each step computes or writes."""
