"""Independent oracles for the tests: POT's log-domain Sinkhorn on each row, with the reduced
problem when marginals have zeros, and eps-scaling warm starts so small eps converges.

The oracle runs in float64 to 1e-12 and takes up to seconds per row, so its values are cached per
process on the exact input bytes: a float32 test and its float64 twin ask with the same float64
problem (the generators of tests/utils.py build float64 and cast), and pay once.
"""
import numpy as np
import ot

_CACHE: dict = {}


def pot_sinkhorn_loss(a, b, M, eps, stop=1e-12, max_iter=50000):
    """Primal value <T, M> - eps H(T), H = -sum T(log T - 1), of POT's converged plan."""
    a, b, M = (np.asarray(x, dtype=np.float64) for x in (a, b, M))
    ia, ib = a > 0, b > 0
    a, b, M = a[ia], b[ib], M[np.ix_(ia, ib)]
    e, warm = float(M.max() - M.min()), None
    with np.errstate(over="ignore"):  # POT's exp of far-off potentials during the annealing
        while e > eps:  # anneal with warm starts: plain iterations converge too slowly at 1e-3
            _, log = ot.sinkhorn(a, b, M, e, method="sinkhorn_log", numItermax=20, stopThr=0,
                                 warmstart=warm, log=True, warn=False)
            nxt = max(e * 0.5, eps)
            warm = (log["log_u"] * e / nxt, log["log_v"] * e / nxt)
            e *= 0.5
        T = ot.sinkhorn(a, b, M, eps, method="sinkhorn_log", numItermax=max_iter, stopThr=stop,
                        warmstart=warm, warn=False)
    H = -(T * (np.log(np.where(T > 0, T, 1.0)) - 1.0)).sum()
    return float((T * M).sum() - eps * H)


def pot_batch_losses(a, b, M, eps, **kw):
    """POT's loss for every row of a batched problem (tensors of any float dtype), cached."""
    a, b, M = (x.detach().double().cpu().numpy() for x in (a, b, M))
    key = (a.tobytes(), b.tobytes(), M.tobytes(), a.shape, b.shape, M.shape, float(eps),
           tuple(sorted(kw.items())))
    if key not in _CACHE:
        _CACHE[key] = np.array([pot_sinkhorn_loss(a[i], b[i], M if M.ndim == 2 else M[i], eps,
                                                  **kw) for i in range(a.shape[0])])
    return _CACHE[key].copy()
