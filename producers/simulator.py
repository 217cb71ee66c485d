"""A synthetic marketplace with a hidden ground truth.

The simulator stands in for real apps. It invents users, a catalog and a hidden
model of how likely each user is to click and buy each item in each request
context. Two uses follow from that:

* **organic traffic**: :meth:`Marketplace.events` yields view/click/purchase
  events (docs/contracts.md "Event schema") as real users would produce them, browsing
  by taste and popularity rather than by the optimum;
* **ground truth**: the exact click and purchase probabilities, the best item
  for a (user, context), and the expected reward of the oracle and of uniform
  random choice, so that a learned policy can be scored against the truth, and a
  closed-loop player can draw a user's response to a shown item
  (:meth:`Marketplace.draw_outcome`, :meth:`Marketplace.respond`).

No Kafka or Redis here: the simulator only builds event dicts (JSON-ready: plain
``str``/``int``/``float``/``bool`` values, no numpy scalars). Everything is
deterministic for a given :class:`MarketConfig` (seed included).

The model, for user ``u``, item ``i`` of category ``k = k(i)``, context ``c``
with a device ``d`` and a local hour of day ``h``::

    P(click | view) = sigmoid( b0
                               + q[i]                                 item quality
                               + 0.6 s_taste dot(theta[u], phi[i]) / sqrt(D)  hidden taste
                               + a[u, k]                              user x category
                               + delta[d, k]                          device x category
                               + gamma[k] cos(2 pi (h - h_peak[k]) / 24) )  hour x category
    P(purchase | click) = sigmoid( c0 + a[u, k] / 2 - beta[u] z[i] + eps[d] )
    P(purchase | view)  = P(click | view) * P(purchase | click)

with ``q ~ N(0, 0.35)``, ``theta, phi ~ N(0, I_D)`` (``D = latent_dim``),
``a ~ N(0, 0.8 s_taste)``, ``delta ~ N(0, 0.8 s_ctx)``, ``gamma ~ s_ctx U(0.4, 1.2)``,
``h_peak ~ U(0, 24)``, where ``s_taste``/``s_ctx`` are the config's
``taste_strength``/``context_strength``. ``z[i]`` is the item's standardized log
price, ``beta[u] ~ LogNormal(log 0.6, 0.4)`` the user's price sensitivity and
``eps[d] ~ N(0, 0.3)`` a device effect on buying.

``b0`` and ``c0`` are solved at construction so that organic traffic has an
overall click rate of ``target_ctr`` and a purchase rate given a click of
``purchase_rate``. The latent vectors ``theta``/``phi`` are never published: a
learner sees only the category, price and brand of items, the user's history and
the context; the device x category and hour x category terms are what make the
best item depend on the context as well as on the user.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import numpy as np
import numpy.typing as npt

__all__ = ["CLICKS", "Context", "MarketConfig", "Marketplace", "Payoff"]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
Context = Mapping[str, Any]
"""A request context as it appears in events: ``{"device": "mobile", "hour": 13}``."""

# Relative traffic per local hour of day (0..23): quiet nights, an evening peak.
_HOURLY_TRAFFIC: Final = (
    0.6, 0.4, 0.25, 0.2, 0.2, 0.3, 0.5, 0.8, 1.0, 1.1, 1.2, 1.3,
    1.4, 1.3, 1.2, 1.2, 1.3, 1.4, 1.6, 1.8, 1.9, 1.7, 1.3, 0.9,
)  # fmt: skip
# Quantity of a purchase: mostly 1, sometimes 2 or 3.
_QUANTITIES: Final = (1, 2, 3)
_QUANTITY_P: Final = (0.82, 0.12, 0.06)
# Traffic is generated in blocks of this many views (fixed: part of determinism).
_BLOCK: Final = 256
# Calibration looks at no more than this many (user, device, hour, item) cells.
_CALIBRATION_CELLS: Final = 3_000_000


class Payoff(NamedTuple):
    """What a click and a purchase of the shown item are worth, for the expected rewards
    of the ground truth (the worker's ``reward_click`` and ``reward_purchase``)."""

    click: float = 1.0
    purchase: float = 0.0


CLICKS: Final = Payoff()
"""A click is worth 1, a purchase nothing more: the expected reward is P(click)."""


@dataclass(frozen=True)
class MarketConfig:
    """Shape of the simulated marketplace. Every field has a default.

    ``target_ctr`` is the click-rate scale: the overall click rate of organic
    views (clicks / views). ``purchase_rate`` is the mean purchase probability of
    an organic click. ``taste_strength`` scales the user-specific terms and
    ``context_strength`` the device x category and hour x category terms.
    ``activity_sigma`` is the spread of the log-normal user activity (larger:
    a few users produce most of the traffic). ``primary_device_share`` is how
    often a user uses their own usual device. ``browse_taste`` is how strongly
    organic browsing follows the user's category preferences (0: popularity
    only). Click delays (after the view) and purchase delays (after the click)
    are exponential with the given means, and capped at ten times the mean.
    ``run_tag``, when set, goes into every event_id (``sim-{run_tag}-{seed}-{n}``)
    so that two runs with the same seed do not share idempotency keys.
    """

    n_users: int = 500
    n_items: int = 40
    n_categories: int = 6
    n_brands: int = 8
    seed: int = 0
    devices: tuple[str, ...] = ("mobile", "desktop", "tablet")
    device_weights: tuple[float, ...] | None = None
    latent_dim: int = 8
    target_ctr: float = 0.07
    purchase_rate: float = 0.15
    price_min: float = 5.0
    price_max: float = 500.0
    start_ms: int = 1_790_000_000_000
    mean_gap_ms: float = 250.0
    taste_strength: float = 1.0
    context_strength: float = 1.0
    activity_sigma: float = 1.5
    primary_device_share: float = 0.7
    browse_taste: float = 1.0
    click_delay_ms: float = 4_000.0
    purchase_delay_ms: float = 45_000.0
    run_tag: str = ""

    def __post_init__(self) -> None:
        for name in ("n_users", "n_items", "n_categories", "n_brands", "latent_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not self.devices or len(set(self.devices)) != len(self.devices):
            raise ValueError("devices must be a non-empty tuple of distinct names")
        if self.device_weights is not None and (
            len(self.device_weights) != len(self.devices)
            or any(w < 0 for w in self.device_weights)
            or sum(self.device_weights) <= 0
        ):
            raise ValueError("device_weights needs one weight >= 0 per device, not all zero")
        for name in ("target_ctr", "purchase_rate"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in (0, 1)")
        if not 0.0 < self.price_min <= self.price_max:
            raise ValueError("need 0 < price_min <= price_max")
        if not 0.0 <= self.primary_device_share <= 1.0:
            raise ValueError("primary_device_share must be in [0, 1]")
        for name in ("mean_gap_ms", "click_delay_ms", "purchase_delay_ms"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")
        for name in ("taste_strength", "context_strength", "activity_sigma", "browse_taste"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.start_ms < 0:
            raise ValueError("start_ms must be >= 0")

    def history_span_ms(self, n_steps: int) -> int:
        """Event time that ``n_steps`` views (or closed-loop decisions) take, with room to
        spare: the gaps' mean plus six standard deviations, and the longest follow-up."""
        g = self.mean_gap_ms + 1.0  # gaps are whole ms, at least 1
        return int(n_steps * g + 6.0 * g * n_steps**0.5) + int(
            _cap(self.click_delay_ms) + _cap(self.purchase_delay_ms)
        )

    def ending_by(self, now_ms: int, n_steps: int) -> MarketConfig:
        """This config with ``start_ms`` early enough that ``n_steps`` end before ``now_ms``.

        The worker refuses events dated ahead of its clock (``max_future_skew_ms``), and
        simulated time runs faster than the wall clock: a simulated history lies in the past.
        """
        return dataclasses.replace(self, start_ms=max(0, now_ms - self.history_span_ms(n_steps)))


def _sigmoid(x: FloatArray) -> FloatArray:
    out: FloatArray = 0.5 * (1.0 + np.tanh(0.5 * x))
    return out


def _solve_intercept(rest: FloatArray, weights: FloatArray, target: float) -> float:
    """The ``b`` with ``sum(weights * sigmoid(b + rest)) == target`` (weights sum to 1)."""
    lo, hi = -60.0, 60.0
    b = math.log(target / (1.0 - target)) - float(np.sum(weights * rest))
    for _ in range(100):
        p = _sigmoid(b + rest)
        f = float(np.sum(weights * p)) - target
        if abs(f) < 1e-12:
            break
        if f > 0:
            hi = b
        else:
            lo = b
        slope = float(np.sum(weights * p * (1.0 - p)))
        step = b - f / slope if slope > 0 else lo - 1.0
        b = step if lo < step < hi else 0.5 * (lo + hi)
    return b


class Marketplace:
    """A simulated marketplace: users, a catalog, a hidden click/purchase model.

    Attributes: ``config``, ``users`` (``"user-0001"``, ...), ``items``
    (``"item-001"``, ...), ``categories`` (``"cat-0"``, ...), ``devices``.

    The marketplace is one simulated world: successive :meth:`events` calls
    continue its clock and its event numbering, so event_ids never repeat
    within a marketplace; two marketplaces built from the same config produce
    the same stream. See the module docstring for the click/purchase formulas.

    Example::

        >>> market = Marketplace(MarketConfig(seed=7))
        >>> catalog = market.catalog_events()          # one "item" event per item
        >>> stream = list(market.events(1000))         # organic view/click/purchase
        >>> rng = np.random.default_rng(1)
        >>> user, ctx = market.sample_user(rng), market.sample_context(rng)
        >>> best = market.best_item(user, ctx)         # the oracle's choice
        >>> market.oracle_value(user, ctx) >= market.uniform_value(user, ctx)
        True
        >>> clicked, purchased = market.draw_outcome(user, best, ctx, rng)
    """

    def __init__(self, config: MarketConfig | None = None) -> None:
        cfg = config if config is not None else MarketConfig()
        self.config = cfg
        world_ss, traffic_ss, calib_ss = np.random.SeedSequence(cfg.seed).spawn(3)
        rng = np.random.default_rng(world_ss)
        n_u, n_i, n_k, n_d = cfg.n_users, cfg.n_items, cfg.n_categories, len(cfg.devices)

        uw = max(4, len(str(n_u)))
        iw = max(3, len(str(n_i)))
        self.users: list[str] = [f"user-{j + 1:0{uw}d}" for j in range(n_u)]
        self.items: list[str] = [f"item-{j + 1:0{iw}d}" for j in range(n_i)]
        self.categories: list[str] = [f"cat-{k}" for k in range(n_k)]
        self.devices: list[str] = list(cfg.devices)
        self._user_index = {u: j for j, u in enumerate(self.users)}
        self._item_index = {i: j for j, i in enumerate(self.items)}
        self._device_index = {d: j for j, d in enumerate(self.devices)}

        # Catalog: every category gets items (round robin, shuffled); prices
        # cluster by category on a log scale; brands are uniform.
        self._cat: IntArray = rng.permutation(np.arange(n_i) % n_k).astype(np.int64)
        lo, hi = math.log(cfg.price_min), math.log(cfg.price_max)
        margin = min(0.5, (hi - lo) / 4)
        cat_centre = rng.uniform(lo + margin, hi - margin, n_k)
        log_price = np.clip(cat_centre[self._cat] + rng.normal(0.0, 0.4, n_i), lo, hi)
        self._price: list[float] = [
            min(max(round(float(p), 2), cfg.price_min), cfg.price_max) for p in np.exp(log_price)
        ]
        self._brand: list[str] = [f"brand-{b}" for b in rng.integers(0, cfg.n_brands, n_i)]
        lp = np.log(np.asarray(self._price, dtype=np.float64))
        self._zprice: FloatArray = (lp - lp.mean()) / (lp.std() + 1e-9)

        # Hidden click model.
        d = cfg.latent_dim
        self._quality: FloatArray = rng.normal(0.0, 0.35, n_i)
        self._phi: FloatArray = rng.normal(0.0, 1.0, (n_i, d))
        self._theta: FloatArray = rng.normal(0.0, 1.0, (n_u, d)) * (
            0.6 * cfg.taste_strength / math.sqrt(d)
        )
        self._affinity: FloatArray = rng.normal(0.0, 0.8 * cfg.taste_strength, (n_u, n_k))
        self._device_fx: FloatArray = rng.normal(0.0, 0.8 * cfg.context_strength, (n_d, n_k))
        self._hour_amp: FloatArray = cfg.context_strength * rng.uniform(0.4, 1.2, n_k)
        self._hour_peak: FloatArray = rng.uniform(0.0, 24.0, n_k)
        # Hidden purchase model.
        self._price_sens: FloatArray = rng.lognormal(math.log(0.6), 0.4, n_u)
        self._device_buy: FloatArray = rng.normal(0.0, 0.3, n_d)

        # Organic behaviour: activity, device habits, hours, browsing.
        activity = rng.lognormal(0.0, cfg.activity_sigma, n_u)
        self._activity: FloatArray = activity / activity.sum()
        self._activity_cum: FloatArray = np.cumsum(self._activity)
        if cfg.device_weights is None:
            dw = np.array([0.6**j for j in range(n_d)], dtype=np.float64)
        else:
            dw = np.asarray(cfg.device_weights, dtype=np.float64)
        self._device_w: FloatArray = dw / dw.sum()
        self._device_cum: FloatArray = np.cumsum(self._device_w)
        self._primary: IntArray = np.searchsorted(self._device_cum, rng.random(n_u)).astype(
            np.int64
        )
        self._primary = np.minimum(self._primary, n_d - 1)
        hw = np.asarray(_HOURLY_TRAFFIC, dtype=np.float64)
        self._hour_w: FloatArray = hw / hw.sum()
        self._hour_cum: FloatArray = np.cumsum(self._hour_w)
        self._log_pop: FloatArray = self._quality / 0.35 * 0.5 + rng.normal(0.0, 0.7, n_i)

        self._b0 = 0.0
        self._c0 = 0.0
        self._calibrate(np.random.default_rng(calib_ss))

        self._traffic_rng = np.random.default_rng(traffic_ss)
        self._prefix = f"sim-{cfg.run_tag}-{cfg.seed}" if cfg.run_tag else f"sim-{cfg.seed}"
        self._counter = 0
        self._seq = 0
        self._clock = cfg.start_ms
        self._pending: list[tuple[int, int, dict[str, Any]]] = []

    # ------------------------------------------------------------------ catalog

    def item_features(self, item_id: str) -> dict[str, Any]:
        """Catalog features of an item: ``{"category", "price", "brand"}`` (JSON-ready)."""
        j = self._item(item_id)
        return {
            "category": self.categories[int(self._cat[j])],
            "price": self._price[j],
            "brand": self._brand[j],
        }

    def catalog_events(self) -> list[dict[str, Any]]:
        """One ``item`` event per item, stamped ``start_ms``.

        Their event_ids (``sim-{seed}-item-{n}``) do not depend on when this is
        called, so publishing the catalog twice is idempotent.
        """
        return [
            {
                "event_id": f"{self._prefix}-item-{j + 1}",
                "type": "item",
                "item_id": item_id,
                "timestamp": self.config.start_ms,
                "features": self.item_features(item_id),
                "active": True,
            }
            for j, item_id in enumerate(self.items)
        ]

    # ------------------------------------------------------------- ground truth

    def click_probabilities(self, user_id: str, context: Context) -> FloatArray:
        """P(click | view) of every item (in ``items`` order) for this user and context."""
        u = self._user(user_id)
        dev, hour = self._context(context)
        return _sigmoid(self._b0 + self._click_rest(u, dev, hour))

    def purchase_probabilities(self, user_id: str, context: Context) -> FloatArray:
        """P(purchase | view) = P(click) * P(purchase | click), every item, ``items`` order."""
        u = self._user(user_id)
        dev, hour = self._context(context)
        click = _sigmoid(self._b0 + self._click_rest(u, dev, hour))
        buy = _sigmoid(self._c0 + self._buy_rest(u, dev))
        out: FloatArray = click * buy
        return out

    def expected_rewards(
        self, user_id: str, context: Context, payoff: Payoff = CLICKS
    ) -> FloatArray:
        """Expected reward of showing each item (``items`` order):
        ``payoff.click * P(click) + payoff.purchase * P(purchase)``."""
        rewards: FloatArray = payoff.click * self.click_probabilities(user_id, context)
        if payoff.purchase:
            rewards = rewards + payoff.purchase * self.purchase_probabilities(user_id, context)
        return rewards

    def click_probability(self, user_id: str, item_id: str, context: Context) -> float:
        """P(click | the user is shown ``item_id`` in ``context``)."""
        return float(self.click_probabilities(user_id, context)[self._item(item_id)])

    def purchase_probability(self, user_id: str, item_id: str, context: Context) -> float:
        """P(purchase | view): the probability that showing the item ends in a purchase."""
        return float(self.purchase_probabilities(user_id, context)[self._item(item_id)])

    def purchase_given_click(self, user_id: str, item_id: str, context: Context) -> float:
        """P(purchase | click) of the item."""
        u, j = self._user(user_id), self._item(item_id)
        dev, _ = self._context(context)
        return float(_sigmoid(self._c0 + self._buy_rest(u, dev))[j])

    def expected_reward(
        self, user_id: str, item_id: str, context: Context, payoff: Payoff = CLICKS
    ) -> float:
        """``payoff.click * P(click) + payoff.purchase * P(purchase)`` of showing the item."""
        rewards = self.expected_rewards(user_id, context, payoff)
        return float(rewards[self._item(item_id)])

    def best_item(self, user_id: str, context: Context, payoff: Payoff = CLICKS) -> str:
        """The item with the highest expected reward for this user in this context."""
        rewards = self.expected_rewards(user_id, context, payoff)
        return self.items[int(np.argmax(rewards))]

    def oracle_value(self, user_id: str, context: Context, payoff: Payoff = CLICKS) -> float:
        """Expected reward of the oracle (always shows :meth:`best_item`)."""
        return float(np.max(self.expected_rewards(user_id, context, payoff)))

    def uniform_value(self, user_id: str, context: Context, payoff: Payoff = CLICKS) -> float:
        """Expected reward of showing an item chosen uniformly at random."""
        return float(np.mean(self.expected_rewards(user_id, context, payoff)))

    def draw_outcome(
        self, user_id: str, item_id: str, context: Context, rng: np.random.Generator
    ) -> tuple[bool, bool]:
        """Draw the user's response to being shown the item: ``(clicked, purchased)``.

        ``purchased`` implies ``clicked``.
        """
        u, j = self._user(user_id), self._item(item_id)
        dev, hour = self._context(context)
        p_click = float(_sigmoid(self._b0 + self._click_rest(u, dev, hour))[j])
        clicked = bool(rng.random() < p_click)
        if not clicked:
            return False, False
        p_buy = float(_sigmoid(self._c0 + self._buy_rest(u, dev))[j])
        return True, bool(rng.random() < p_buy)

    # ----------------------------------------------------------------- sampling

    def sample_user(self, rng: np.random.Generator) -> str:
        """A user drawn by activity (active users come back more often)."""
        j = int(np.searchsorted(self._activity_cum, rng.random(), side="right"))
        return self.users[min(j, len(self.users) - 1)]

    def sample_context(
        self, rng: np.random.Generator, user_id: str | None = None
    ) -> dict[str, Any]:
        """A request context ``{"device": str, "hour": int}``.

        The hour is the user's local hour of day (evening-heavy traffic), not
        derived from event timestamps. With ``user_id``, the device follows that
        user's habit (their usual device most of the time); without, the
        population's device mix.
        """
        u = None if user_id is None else self._user(user_id)
        dev = self._draw_devices(rng, None if u is None else np.array([u]))[0]
        hour = int(np.searchsorted(self._hour_cum, rng.random(), side="right"))
        return {"device": self.devices[int(dev)], "hour": min(hour, 23)}

    # ------------------------------------------------------------------ traffic

    @property
    def max_followup_ms(self) -> int:
        """Longest possible delay from a view to its purchase (click and purchase caps)."""
        cfg = self.config
        return int(_cap(cfg.click_delay_ms)) + int(_cap(cfg.purchase_delay_ms))

    def events(
        self, n: int | None = None, rng: np.random.Generator | None = None
    ) -> Iterator[dict[str, Any]]:
        """Organic traffic: ``n`` events (forever if ``None``), in timestamp order.

        Each step picks a user by activity, a context (the user's device habit,
        the hour-of-day traffic curve) and an item by browsing (popularity times
        the user's category taste: not the optimum), and emits a ``view``. With
        the true click probability a ``click`` of the same item follows a few
        seconds later, and after a click, with the true purchase-given-click
        probability, a ``purchase`` (the item's price, quantity mostly 1).
        Views are spaced by exponential gaps of mean ``mean_gap_ms``; timestamps
        never decrease along the stream. Organic views carry no decision_id.

        ``rng`` defaults to the marketplace's own traffic generator (seeded from
        the config). Follow-ups not yet due when ``n`` is reached stay pending
        and come out at the start of the next call.
        """
        rng = self._traffic_rng if rng is None else rng
        emitted = 0
        while n is None or emitted < n:
            # Everything at or before the clock is final: later views come after it.
            while self._pending and self._pending[0][0] <= self._clock:
                if n is not None and emitted >= n:
                    return
                yield self._emit(heapq.heappop(self._pending)[2])
                emitted += 1
            if n is not None and emitted >= n:
                return
            self._generate_block(rng)

    def respond(
        self,
        view: Mapping[str, Any],
        rng: np.random.Generator | None = None,
        *,
        link_decision: bool = True,
    ) -> list[dict[str, Any]]:
        """The user's follow-up events to a ``view`` (e.g. of a recommended item).

        Draws ``(clicked, purchased)`` with :meth:`draw_outcome` and returns the
        ``click`` (and ``purchase``) events, stamped after the view with the
        same delays as organic traffic, numbered from the marketplace's counter.
        With ``link_decision`` they carry the view's ``decision_id`` if it has one.
        """
        if view.get("type") != "view":
            raise ValueError("respond() takes a view event")
        rng = self._traffic_rng if rng is None else rng
        user_id, item_id = str(view["user_id"]), str(view["item_id"])
        context = dict(view.get("context") or {})
        clicked, purchased = self.draw_outcome(user_id, item_id, context, rng)
        out: list[dict[str, Any]] = []
        if not clicked:
            return out
        cfg = self.config
        extra: dict[str, Any] = {}
        if link_decision and view.get("decision_id") is not None:
            extra["decision_id"] = view["decision_id"]
        t_click = int(view["timestamp"]) + _delay(rng.exponential(cfg.click_delay_ms), cfg)
        out.append(self._emit(_body("click", user_id, item_id, t_click, context, extra)))
        if purchased:
            t_buy = t_click + _delay(rng.exponential(cfg.purchase_delay_ms), cfg, purchase=True)
            q = int(rng.choice(_QUANTITIES, p=_QUANTITY_P))
            body = _body("purchase", user_id, item_id, t_buy, context, extra)
            body["price"] = self._price[self._item(item_id)]
            body["quantity"] = q
            out.append(self._emit(body))
        return out

    # ---------------------------------------------------------------- internals

    def _user(self, user_id: str) -> int:
        try:
            return self._user_index[user_id]
        except KeyError:
            raise KeyError(f"unknown user {user_id!r}") from None

    def _item(self, item_id: str) -> int:
        try:
            return self._item_index[item_id]
        except KeyError:
            raise KeyError(f"unknown item {item_id!r}") from None

    def _context(self, context: Context) -> tuple[int, float]:
        device = context.get("device")
        if device not in self._device_index:
            raise ValueError(f"context device {device!r} is not one of {self.devices}")
        hour = context.get("hour")
        if isinstance(hour, bool) or not isinstance(hour, int | float):
            raise ValueError(f"context hour must be a number in [0, 24), got {hour!r}")
        return self._device_index[device], float(hour) % 24.0

    def _click_rest(self, u: Any, dev: Any, hour: Any, items: Any = None) -> FloatArray:
        """Click logit without the intercept. Scalars give all items; arrays are per row."""
        j = slice(None) if items is None else items
        cat = self._cat[j]
        latent = (
            self._phi @ self._theta[u]
            if items is None
            else np.einsum("nd,nd->n", self._phi[j], self._theta[u])
        )
        hour_fx = self._hour_amp[cat] * np.cos(
            (2.0 * math.pi / 24.0) * (np.asarray(hour, dtype=np.float64) - self._hour_peak[cat])
        )
        out: FloatArray = (
            self._quality[j] + latent + self._affinity[u, cat] + self._device_fx[dev, cat] + hour_fx
        )
        return out

    def _buy_rest(self, u: Any, dev: Any, items: Any = None) -> FloatArray:
        """Purchase-given-click logit without the intercept (same shapes as _click_rest)."""
        j = slice(None) if items is None else items
        cat = self._cat[j]
        out: FloatArray = (
            0.5 * self._affinity[u, cat]
            - self._price_sens[u] * self._zprice[j]
            + self._device_buy[dev]
        )
        return out

    def _browse_cum(self, users: IntArray) -> FloatArray:
        """Cumulative browsing distribution over items, one row per user."""
        logits = (
            self._log_pop[None, :] + self.config.browse_taste * self._affinity[users][:, self._cat]
        )
        logits -= logits.max(axis=1, keepdims=True)
        w = np.exp(logits)
        cum: FloatArray = np.cumsum(w / w.sum(axis=1, keepdims=True), axis=1)
        return cum

    def _device_probs(self, users: IntArray) -> FloatArray:
        """Per-user device distribution: usual device mixed with the population's mix."""
        share = self.config.primary_device_share
        probs = np.tile((1.0 - share) * self._device_w, (len(users), 1))
        probs[np.arange(len(users)), self._primary[users]] += share
        return probs

    def _draw_devices(self, rng: np.random.Generator, users: IntArray | None) -> IntArray:
        n_d = len(self.devices)
        if users is None:
            dev = np.searchsorted(self._device_cum, rng.random(1), side="right")
            return np.minimum(dev, n_d - 1).astype(np.int64)
        habit = rng.random(len(users)) < self.config.primary_device_share
        other = np.searchsorted(self._device_cum, rng.random(len(users)), side="right")
        dev = np.where(habit, self._primary[users], np.minimum(other, n_d - 1))
        return dev.astype(np.int64)

    def _calibrate(self, rng: np.random.Generator) -> None:
        """Solve the intercepts b0 and c0 for target_ctr and purchase_rate.

        Exact expectation over organic traffic (users by activity, their device
        habit, the hourly curve, their browsing) on a grid of users; with many
        users and items, on a random subset of users (reweighted by activity).
        """
        cfg = self.config
        n_d, n_i = len(self.devices), cfg.n_items
        max_users = max(1, _CALIBRATION_CELLS // (n_d * 24 * n_i))
        if cfg.n_users <= max_users:
            users = np.arange(cfg.n_users, dtype=np.int64)
        else:
            users = np.sort(rng.choice(cfg.n_users, size=max_users, replace=False)).astype(np.int64)
        n_u = len(users)
        act = self._activity[users] / self._activity[users].sum()
        browse = np.diff(self._browse_cum(users), axis=1, prepend=0.0)  # (U, I)
        dev_p = self._device_probs(users)  # (U, D)
        cat = self._cat
        base = (
            self._quality[None, :]
            + self._theta[users] @ self._phi.T
            + self._affinity[users][:, cat]
        )  # (U, I)
        hours = np.arange(24, dtype=np.float64)
        hour_fx = self._hour_amp[cat][None, :] * np.cos(
            (2.0 * math.pi / 24.0) * (hours[:, None] - self._hour_peak[cat][None, :])
        )  # (H, I)
        rest = (
            base[:, None, None, :]
            + self._device_fx[:, cat][None, :, None, :]
            + hour_fx[None, None, :, :]
        )  # (U, D, H, I)
        weights = (
            act[:, None, None, None]
            * dev_p[:, :, None, None]
            * self._hour_w[None, None, :, None]
            * browse[:, None, None, :]
        )
        self._b0 = _solve_intercept(rest.ravel(), weights.ravel(), cfg.target_ctr)

        click = _sigmoid(self._b0 + rest)  # (U, D, H, I)
        clicks = (weights * click).sum(axis=2)  # (U, D, I): hours do not affect buying
        buy_rest = (
            0.5 * self._affinity[users][:, cat][:, None, :]
            - self._price_sens[users][:, None, None] * self._zprice[None, None, :]
            + self._device_buy[None, :, None]
        )  # (U, D, I)
        assert buy_rest.shape == (n_u, n_d, n_i)
        self._c0 = _solve_intercept(
            buy_rest.ravel(), (clicks / clicks.sum()).ravel(), cfg.purchase_rate
        )

    def _generate_block(self, rng: np.random.Generator) -> None:
        """Draw the next _BLOCK organic views and their follow-ups into the pending heap."""
        cfg = self.config
        b = _BLOCK
        users = np.searchsorted(self._activity_cum, rng.random(b), side="right")
        users = np.minimum(users, cfg.n_users - 1).astype(np.int64)
        devs = self._draw_devices(rng, users)
        hours = np.minimum(np.searchsorted(self._hour_cum, rng.random(b), side="right"), 23)
        cum = self._browse_cum(users)
        items = np.minimum((cum < rng.random(b)[:, None]).sum(axis=1), cfg.n_items - 1)
        gaps = np.maximum(1, np.rint(rng.exponential(cfg.mean_gap_ms, b))).astype(np.int64)
        p_click = _sigmoid(self._b0 + self._click_rest(users, devs, hours, items))
        p_buy = _sigmoid(self._c0 + self._buy_rest(users, devs, items))
        clicked = rng.random(b) < p_click
        bought = clicked & (rng.random(b) < p_buy)
        click_delay = rng.exponential(cfg.click_delay_ms, b)
        buy_delay = rng.exponential(cfg.purchase_delay_ms, b)
        qty = rng.choice(_QUANTITIES, size=b, p=_QUANTITY_P)

        t = self._clock
        for r in range(b):
            t += int(gaps[r])
            user_id = self.users[int(users[r])]
            item_id = self.items[int(items[r])]
            context = {"device": self.devices[int(devs[r])], "hour": int(hours[r])}
            self._push(t, _body("view", user_id, item_id, t, context))
            if clicked[r]:
                t_click = t + _delay(float(click_delay[r]), cfg)
                self._push(t_click, _body("click", user_id, item_id, t_click, context))
                if bought[r]:
                    t_buy = t_click + _delay(float(buy_delay[r]), cfg, purchase=True)
                    body = _body("purchase", user_id, item_id, t_buy, context)
                    body["price"] = self._price[int(items[r])]
                    body["quantity"] = int(qty[r])
                    self._push(t_buy, body)
        self._clock = t

    @property
    def clock(self) -> int:
        """The event time reached so far (the latest view's)."""
        return self._clock

    def advance_clock(self, to_ms: int) -> None:
        """Move the clock forward (a closed loop run on this marketplace took time too)."""
        self._clock = max(self._clock, to_ms)

    def _push(self, timestamp: int, body: dict[str, Any]) -> None:
        heapq.heappush(self._pending, (timestamp, self._seq, body))
        self._seq += 1

    def _emit(self, body: dict[str, Any]) -> dict[str, Any]:
        event = {"event_id": f"{self._prefix}-{self._counter}", **body}
        self._counter += 1
        return event


def _cap(mean_ms: float) -> float:
    return 10.0 * mean_ms


def _delay(raw_ms: float, cfg: MarketConfig, *, purchase: bool = False) -> int:
    """A follow-up delay in whole ms: at least 1, at most ten times its mean."""
    mean = cfg.purchase_delay_ms if purchase else cfg.click_delay_ms
    return max(1, round(min(raw_ms, _cap(mean))))


def _body(
    kind: str,
    user_id: str,
    item_id: str,
    timestamp: int,
    context: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": kind,
        "user_id": user_id,
        "item_id": item_id,
        "timestamp": int(timestamp),
        "context": dict(context),
    }
    if extra:
        body.update(extra)
    return body
