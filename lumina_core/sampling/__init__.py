"""Rectified-flow sampling: time grids, solvers, guidance and the generation loop, for any velocity model."""
