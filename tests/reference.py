"""An independent, deliberately plain implementation of Lookahead (Algorithm 1 of Zhang et al. 2019).

Tests compare `lookahead_dist` against this loop. It shares no code with the package: one Python
loop over parameters, slow weights in a list, one global step counter.
"""

from __future__ import annotations

from collections import defaultdict

import torch

MOMENTUM_KEYS = ("momentum_buffer", "exp_avg")


class ReferenceLookahead:
    """`inner` is a torch optimizer over `params`; call `step()` after backward.

    `k_alpha_per_group` optionally gives (k, alpha) per param group of `inner` (default: k, alpha).
    `pullback`: "none" | "reset" | "pullback" (momentum at φ₀ is taken as zero).
    """

    def __init__(self, inner, k, alpha, pullback="none", k_alpha_per_group=None):
        self.inner = inner
        self.k = k
        self.alpha = alpha
        self.pullback = pullback
        self.groups = k_alpha_per_group or [(k, alpha)] * len(inner.param_groups)
        self.slow = {}
        for group in inner.param_groups:
            for p in group["params"]:
                self.slow[p] = p.detach().clone()
        self.slow_momentum = defaultdict(dict)
        self.t = 0

    @torch.no_grad()
    def step(self):
        self.inner.step()
        self.t += 1
        for (k, alpha), group in zip(self.groups, self.inner.param_groups):
            if self.t % k != 0:
                continue
            for p in group["params"]:
                phi = self.slow[p]
                phi.add_(alpha * (p - phi))
                p.copy_(phi)
                if self.pullback == "reset":
                    self.inner.state[p] = {}
                elif self.pullback == "pullback":
                    for key in MOMENTUM_KEYS:
                        m = self.inner.state[p].get(key)
                        if m is None:
                            continue
                        sm = self.slow_momentum[p].setdefault(key, torch.zeros_like(m))
                        sm.add_(alpha * (m - sm))
                        m.copy_(sm)


def max_abs_diff(a, b):
    return max((x.detach().float() - y.detach().float()).abs().max().item() for x, y in zip(a, b))
