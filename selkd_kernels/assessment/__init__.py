"""Teacher assessment (paper 1, Sec. 5, Alg. 4): the Sinkhorn score, the transferability
baselines it is compared with, and ranking-quality measures."""
