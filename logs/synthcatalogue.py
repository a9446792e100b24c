"""The catalogue of a synthetic log (`sdm synth`): items, their side features, popularity and successors.

The items table's columns and the planted transition graph (each item's one
fixed successor, uniform within its category) come from here; the samplers
draw items by popularity within a category or a brand, and categories by
life-stage affinity. How they are used is `sdm.logs.synth`'s generative process.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sdm.config import SynthConfig

LEAVES_PER_L1 = 10
"""Leaf categories per first-level category."""
LIFE_STAGES = ["student", "young_single", "young_family", "family", "empty_nest", "retired"]
"""Users' life stages; each first-level category is tied to one of them."""


@dataclass(frozen=True)
class Sampler:
    """Draw items by popularity restricted to one key value (category, brand, ...).

    Items are sorted by key; within key k's block the cumulative popularity runs
    from `lo[k]` to `lo[k] + mass[k]`, so one `searchsorted` draws for any mix of keys.
    """

    order: np.ndarray  # item indices sorted by key
    cum: np.ndarray  # cumulative popularity along `order`
    lo: np.ndarray  # cumulative mass before key k's block
    mass: np.ndarray  # total popularity of key k
    start: np.ndarray  # first position of key k's block
    end: np.ndarray  # one past the last position

    @classmethod
    def build(cls, key: np.ndarray, weight: np.ndarray, n_keys: int) -> Sampler:
        order = np.argsort(key, kind="stable")
        cum = np.cumsum(weight[order])
        counts = np.bincount(key, minlength=n_keys)
        end = np.cumsum(counts)
        start = end - counts
        mass = np.bincount(key, weights=weight, minlength=n_keys)
        lo = np.concatenate([[0.0], cum])[start]
        return cls(order, cum, lo, mass, start, end)

    def draw(self, key: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Item index per (key, uniform); keys must have at least one item."""
        pos = np.searchsorted(self.cum, self.lo[key] + u * self.mass[key], side="right")
        # Rounding can land one step outside the block: clamp into it.
        pos = np.clip(pos, self.start[key], self.end[key] - 1)
        return self.order[pos]


@dataclass(frozen=True)
class Catalogue:
    """The items of a synthetic log, their side features and planted successors, and the samplers over them."""

    pop: np.ndarray  # item popularity weight
    category: np.ndarray
    category_l1: np.ndarray
    brand: np.ndarray
    shop: np.ndarray
    next_item: np.ndarray
    cat_mass: np.ndarray  # popularity of each category
    by_cat: Sampler
    by_brand: Sampler
    by_stage: Sampler  # categories (not items) by life-stage affinity


def zipf_weights(n: int, s: float, rng: np.random.Generator) -> np.ndarray:
    """Weights r ** -s over ranks r = 1..n, assigned to a random permutation of 0..n-1."""
    w = np.empty(n)
    w[rng.permutation(n)] = np.arange(1, n + 1, dtype=np.float64) ** -s
    return w


def build_catalogue(cfg: SynthConfig) -> Catalogue:
    """Items with category, first-level category, brand, shop and successor item."""
    rng = np.random.default_rng([cfg.seed, 0])
    n_items, n_cats, n_brands, n_shops = cfg.num_items, cfg.num_categories, cfg.num_brands, cfg.num_shops
    n_l1 = max(1, n_cats // LEAVES_PER_L1)

    pop = zipf_weights(n_items, cfg.zipf, rng)
    cat_size = zipf_weights(n_cats, 0.8, rng)
    category = rng.choice(n_cats, size=n_items, p=cat_size / cat_size.sum())
    cat_l1 = rng.permutation(n_cats) % n_l1

    # Brands: each has a home category; an item picks among its category's
    # brands, skewed toward the first (u**2), or any brand when it has none.
    brand_home = np.sort(rng.integers(0, n_cats, size=n_brands))
    b_start = np.searchsorted(brand_home, np.arange(n_cats), side="left")
    b_count = np.searchsorted(brand_home, np.arange(n_cats), side="right") - b_start
    u = rng.random(n_items)
    has = b_count[category] > 0
    brand = np.where(
        has,
        b_start[category] + np.floor(u**2 * b_count[category]).astype(np.int64),
        rng.integers(0, n_brands, size=n_items),
    )
    brand_shop = rng.integers(0, n_shops, size=n_brands)
    shop = (brand_shop[brand] + rng.geometric(0.6, size=n_items) - 1) % n_shops

    by_cat = Sampler.build(category, pop, n_cats)
    # Successors are uniform within the category (not by popularity), so
    # following them leads away from the head: popularity cannot predict them.
    count = by_cat.end - by_cat.start
    next_item = by_cat.order[by_cat.start[category] + np.floor(rng.random(n_items) * count[category]).astype(np.int64)]
    cat_mass = np.bincount(category, weights=pop, minlength=n_cats)
    stage_of_cat = cat_l1 % len(LIFE_STAGES)
    return Catalogue(
        pop=pop,
        category=category,
        category_l1=cat_l1[category],
        brand=brand,
        shop=shop,
        next_item=next_item,
        cat_mass=cat_mass,
        by_cat=by_cat,
        by_brand=Sampler.build(brand, pop, n_brands),
        by_stage=Sampler.build(stage_of_cat, cat_mass + 1e-12, len(LIFE_STAGES)),
    )
