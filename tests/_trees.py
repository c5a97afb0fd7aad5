"""Rooted trees for order-condition tests (Butcher; Hairer, Nørsett & Wanner I.II.2)."""

import math


def rooted_trees(order):
    """Rooted trees by size up to ``order``: ``{n: [tree, ...]}``, each tree in canonical form (a
    sorted tuple of its children)."""
    levels = {1: [()]}
    for n in range(2, order + 1):
        found = set()

        def grow(t):
            yield tuple(sorted((*t, ())))  # a new leaf on the root
            for i, child in enumerate(t):
                for g in grow(child):
                    yield tuple(sorted((*t[:i], g, *t[i + 1 :])))

        for t in levels[n - 1]:
            found.update(grow(t))
        levels[n] = sorted(found)
    return levels


def tree_size(t):
    return 1 + sum(tree_size(c) for c in t)


def density(t):
    """The tree's density gamma(t): the order condition is b . Phi(t) = 1 / gamma(t)."""
    return tree_size(t) * math.prod(density(c) for c in t)
