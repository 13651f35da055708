"""Data: the sources (tfds, an image folder, the digits) and the batch of step s as a pure function
of (seed, s) (`input_pipeline`), and images between uint8 and [-1, 1], grids and PNG
(`images`)."""
