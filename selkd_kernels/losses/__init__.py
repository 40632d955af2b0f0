"""Training losses built on the ops: Sinkhorn KD (paper 1, Eq. 11), selective KD (paper 2,
Eq. 10 and 14) and multi-teacher KD."""
