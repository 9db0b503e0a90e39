"""What the exemplar and film models share: FiLM layers, the measurer, the critic, their
training, the symmetry views and the judge rounds."""
