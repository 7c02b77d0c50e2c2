"""Client-level differential privacy in the central model: DP-FedAvg (McMahan et al. 2018).

**The mechanism.** In round t the server samples m = ``--per-round`` clients. Client k's change of
effective update this round, over every adapted module and the head,

    Delta_k = ( s_k B_k A_k - s_k B0_k A0_k )_modules  (+)  ( h_k - h0_k )

is clipped to L2 norm C (``--dp-clip``): Delta_k <- c_k Delta_k, c_k = min(1, C / ||Delta_k||). The norm
comes from the factors' Gram matrices (:func:`hlora.robust.change_gram`) and the clip is normclip's
(:func:`hlora.robust.clip_update`): the clipped client uploads, in effect, X0 + c_k Delta_k, as the
rank r0 + r factor [c B, (1 - c) B0] [A; A0]. The server releases

    D_t = (1 / m) sum_k c_k Delta_k + N(0, sigma^2 I),     sigma = z C / m     (z: ``--dp-noise``)

**Uniform weights, fixed denominator.** Every client weighs 1/m with m the number *sampled*, not the
number accepted and not n_k / n. With n_k / n weights a client's influence on the average grows with its
data size, which is private and unbounded, so no sensitivity holds; with a denominator that counts the
accepted updates, one client's presence changes every other client's weight. With the fixed 1/m, adding
or removing one client moves sum_k c_k Delta_k / m by at most C / m: that is the sensitivity the noise
is calibrated to. A client rejected by the checks (failed training, wrong shapes, NaN) contributes 0.
For the same reason, the median-relative norm check (``--max-norm-ratio``) and the robust rules are off
under DP: they let one client's update decide whether *other* clients count.

**Where the noise goes.** Only the product-space strategies (hlora, flexlora: state G = the global update
as a thin SVD) take it. Their DP step is the server-optimizer rule of :mod:`hlora.server_opt` on the
noisy change:

    m_t = trunc_c( beta m_{t-1} + D_t ),    G_t = trunc_c( G_{t-1} + eta m_t )    (c: ``--server-rank``)

with avg as eta = 1, beta = 0. It steps from G_{t-1} (the previous release, public) rather than from
HLoRA's own sum_k p_k trunc_{r_k}(G_{t-1}) + ..., whose first term depends on the sampled clients' ranks:
one client's presence would move it by a rank-sized piece of G, not by C / m. D_t is dense (the noise
is full rank): it is formed one module at a time as a d x k float32 matrix, and its truncated SVD
re-decomposes it (post-processing, no privacy cost). Memory: :data:`DENSE_BYTES_PER_ENTRY` bytes per
entry at the SVD's peak, refused above ``--dp-dense-mb`` (:meth:`DP.check_dense`). The head gets its own
N(0, sigma^2) noise on the same D_t.

**Factor-space strategies whose rule is an average of the factors** (fedit, ffa, rolora: FACTOR_DP) take
DP in the space of what they release, the global factors, not in the space of B A: the change of B A is
not linear in the factors, so a bound on it says nothing about the factors, but DP-FedAvg needs a bound on
the *released parameters'* change only. Client k's change is what its update alone moves the strategy's
own average by, against what it was sent:

    Delta_k = agg({u_k}) - agg({p_k})       over the round's trained coordinates (B, A or both) and the head

(:func:`parameter_changes`; agg is the strategy's aggregate of that one client at weight 1, affine in its
factors, so a clipped update X0 + c (X - X0) moves it by exactly c Delta_k). It is clipped to norm C, and
the release is x_t + (1/m) sum_k c_k Delta_k + N(0, sigma^2) on every coordinate the round trains (ffa: B
and the head; rolora: the round's factor and the head; fedit: both factors and the head), x_t the factors
the clients started from (:func:`starting_point`), stepped by the server optimizer's elementwise tensor
rule (avg: x_t + D; avgm, adam, yogi with D as the pseudo-gradient: post-processing of the noisy D). The
coordinates a round does not train are not released anew (ffa's A never changes). Note that C bounds a different norm here (the factors' change at
scaling 1, not s B A's), so its scale differs from hlora's. The strategy's own average is not the rule
under DP: a rank no client of the round holds keeps its value instead of the average's zero-padding or
renormalised weights (both depend on which clients were sampled: a client's presence would move them by
more than C / m).

**Refused**: the other factor-space strategies. fedplora, hetlora: their rule reweighs or prunes ranks by
the round's clients, so one client's presence moves other clients' weights. lorafair: its correction is a
least-squares fit to the products, not affine in one client's factors. fedex: its error term is built from
the products. fedsa: each client keeps its B, a personal model outside the server's release. FLoRA: its
merged update is an exact low-rank sum that clients download as stacks; dense noise makes it full rank, which has no stacked form. Centralized: there are no clients to protect.

**Adaptive clipping** (Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping";
``--dp-adaptive-clip GAMMA``). C is not tuned but follows the GAMMA quantile of the clients' change norms,
starting at C_0 = ``--dp-clip``. After round t, with b_t the number of the round's m sampled clients whose
change has ||Delta_k|| <= C_t (a rejected client's change is 0, so it counts),

    b~_t = ( b_t + N(0, sigma_b^2) ) / m,     C_{t+1} = C_t exp( -eta (b~_t - GAMMA) ),
    eta = 0.2 (:data:`CLIP_LR`),  sigma_b = m / 20 (:data:`COUNT_NOISE_SHARE`: the paper's choice).

The count is a second Gaussian release, of sensitivity 1/2 once centred (sum_k (b_k - 1/2), with m public).
Released together with the clipped sum at multiplier z_D, the pair is one Gaussian mechanism of multiplier
z with z^-2 = z_D^-2 + (2 sigma_b)^-2 (the paper's Theorem 1). So the accountant counts z (``--dp-noise``,
or the one ``--dp-epsilon-target`` chooses), and the average gets the smaller share,
sigma = z_D C_t / m with z_D = (z^-2 - (2 sigma_b)^-2)^(-1/2): defined only for z < 2 sigma_b = m / 10,
refused above (the count would need more noise than the whole budget allows). C_t lives in the state's
``extra`` (checkpoints and resumes exactly); its noise comes from its own seeded stream
(:data:`CLIP_STREAM`). Every row records the round's C_t (``dp_clip``). Like ``clipped``, the rows are the
trusted server's log, not a release: they give b_t exactly.

**Accounting.** dp-accounting's RDP accountant (Mironov 2017; Mironov, Talwar, Zhang 2019) of T
compositions of the Poisson-subsampled Gaussian mechanism with sampling rate q = per_round / clients and
noise multiplier z, converted to (epsilon, delta). hlora samples a fixed-size subset without replacement,
not a Poisson sample: the Poisson analysis is the standard approximation that DP-FedAvg implementations
use (McMahan et al. 2018; TF Privacy), not an exact bound for the sampling hlora does. Every round is
counted (under DP a round is never skipped for too few valid updates: :func:`hlora.server.server_round`).
``--dp-epsilon-target`` chooses z by dp-accounting's own calibration
(:func:`dp_accounting.calibrate_dp_mechanism`).

``--dp-delta`` defaults to 1 / clients^1.1: delta must be well below 1 / clients, since a mechanism that
publishes one random client's data whole is (0, 1 / clients)-DP; the extra power 0.1 keeps it below that
by a factor that grows with the federation.

**Seeds.** The noise of round t comes from a generator seeded by (seed, t) alone
(:func:`hlora.server.client_seed`, stream :data:`NOISE_STREAM`), drawn module by module in the state's
order and then the head: a resumed run draws the same noise.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from hlora.factors import Factor
from hlora.linalg import SVD
from hlora.robust import change_gram, clip_factors
from hlora.server_opt import KEY, ServerOpt, global_step
from hlora.strategies import GlobalState, Payload, Strategy, StrategyError, Update

#: strategies whose state is the global update itself (a thin SVD): the noisy average can be added to it
DP_STRATEGIES = ("hlora", "flexlora")
#: factor-space strategies whose rule is an affine average of each client's factors: DP on the released factors
FACTOR_DP = ("fedit", "ffa", "rolora")
#: why each other strategy is refused (one line each)
REFUSED = {
    "centralized": "the centralized strategy pools the clients' data: there are no client updates to protect",
    "flora": "FLoRA's merged update is an exact low-rank sum that clients download as stacks; the dense noise "
             "makes it full rank, which has no stacked form",
    "fedsa": "FedSA-LoRA keeps each client's B on the client: its models are personal, outside the server's release",
    "fedex": "FedEx-LoRA's error term is built from the clients' products, not a bounded function of one client",
    "lorafair": "LoRA-FAIR's correction is a least-squares fit to the clients' products, not affine in one client's "
                "factors",
    "hetlora": "HetLoRA weighs and prunes ranks by the round's clients, so one client's presence moves the others' "
               "weights",
    "fedplora": "Fed-PLoRA averages each module over the clients that picked it, so one client's presence moves the "
                "others' weights",
}
#: the client_seed stream of the server's DP noise (client -1: the server)
NOISE_STREAM = 4
#: the client_seed stream of adaptive clipping's count noise (client -1: the server)
CLIP_STREAM = 5
#: adaptive clipping's geometric step eta (Andrew et al. 2021)
CLIP_LR = 0.2
#: adaptive clipping's count noise sigma_b, as a share of the clients a round (Andrew et al.: m / 20)
COUNT_NOISE_SHARE = 1 / 20
#: the key of the current clip C_t in GlobalState.extra (adaptive clipping)
CLIP_KEY = "dp_clip"
#: RDP orders: integer orders (computed in closed form, no fractional-order series to converge) up to 1024
ORDERS = tuple(range(2, 65)) + (80, 96, 128, 256, 512, 1024)
#: bytes per entry of one module's dense noisy change at the peak of its float32 SVD: the matrix, the noise,
#: LAPACK's copy and workspace, U and V^T. Measured 31 to 35 (ru_maxrss, torch.linalg.svd, 1 thread, 1024^2
#: and 1536^2); rounded up
DENSE_BYTES_PER_ENTRY = 36


class PrivacyError(StrategyError):
    """DP options that cannot run together (a user mistake)."""


@dataclass
class DP:
    """The DP settings (``--dp-*``). ``clip`` None or 0: off."""

    clip: float | None = None
    noise: float | None = None
    epsilon_target: float | None = None
    delta: float | None = None
    dense_mb: float = 2048.0
    #: adaptive clipping's target quantile GAMMA of the change norms (None: C stays --dp-clip)
    adaptive: float | None = None

    @property
    def on(self) -> bool:
        return bool(self.clip)

    def check(self, *, strategy: str, clients: int, per_round: int, rounds: int, robust: str = "none",
              client_weights: str = "uniform") -> "DP":
        """Refuse what cannot run (raises PrivacyError); fill in the default delta and, with an epsilon
        target, the noise multiplier that meets it."""
        if self.clip is not None and self.clip < 0:
            raise PrivacyError(f"--dp-clip must be >= 0 (0: off), got {self.clip}")
        if self.dense_mb <= 0:
            raise PrivacyError(f"--dp-dense-mb must be > 0, got {self.dense_mb}")
        if not self.on:
            given = [n for n, v in (("--dp-noise", self.noise), ("--dp-epsilon-target", self.epsilon_target),
                                    ("--dp-delta", self.delta), ("--dp-adaptive-clip", self.adaptive))
                     if v is not None]
            if given:
                raise PrivacyError(f"{', '.join(given)} need --dp-clip C (the bound on a client's change)")
            return self
        if self.noise is not None and self.noise < 0:
            raise PrivacyError(f"--dp-noise must be >= 0, got {self.noise}")
        if self.epsilon_target is not None and self.epsilon_target <= 0:
            raise PrivacyError(f"--dp-epsilon-target must be > 0, got {self.epsilon_target}")
        if self.delta is not None and not 0 < self.delta < 1:
            raise PrivacyError(f"--dp-delta must be in (0, 1), got {self.delta}")
        if strategy in REFUSED:
            raise PrivacyError(f"--dp-clip is not defined for {strategy}: {REFUSED[strategy]}")
        if strategy not in DP_STRATEGIES + FACTOR_DP:
            raise PrivacyError(f"--dp-clip is not defined for {strategy}; use one of "
                               f"{', '.join(DP_STRATEGIES + FACTOR_DP)}")
        if robust != "none":
            raise PrivacyError(f"--dp-clip cannot run with --robust {robust}: a rule that selects or scales clients "
                               "by the others' updates breaks the sensitivity C / per-round (DP clipping already "
                               "bounds every client)")
        if client_weights != "uniform":
            raise PrivacyError("--dp-clip needs --client-weights uniform: with n_k/n weights a client's influence "
                               "grows with its private data size, so no sensitivity holds")
        _accounting()  # dp-accounting is installed (else one line), before anything loads
        if self.delta is None:
            self.delta = default_delta(clients)
        q = per_round / clients
        if self.epsilon_target is not None:
            z = calibrate_noise(q, rounds, self.epsilon_target, self.delta)
            if self.noise is not None and not math.isclose(self.noise, z, rel_tol=1e-9):
                raise PrivacyError("give --dp-noise or --dp-epsilon-target, not both")
            self.noise = z
        if self.noise is None:
            raise PrivacyError("--dp-clip needs --dp-noise z or --dp-epsilon-target EPS (--dp-noise 0: clipping "
                               "only, no privacy)")
        if self.adaptive is not None:
            if not 0 < self.adaptive < 1:
                raise PrivacyError(f"--dp-adaptive-clip is the target quantile of the change norms, in (0, 1); "
                                   f"got {self.adaptive}")
            if self.noise and self.noise >= 2 * self.count_std(per_round):  # z = 0: clipping only, no privacy
                chosen = f" (from --dp-epsilon-target {self.epsilon_target:g})" if self.epsilon_target else ""
                raise PrivacyError(
                    f"--dp-adaptive-clip spends part of the noise on the clip's count: z must be below "
                    f"per-round / 10 = {2 * self.count_std(per_round):g}, got {self.noise:.4g}{chosen} (sample "
                    "more clients a round, or fix the clip)")
        return self

    def count_std(self, per_round: int) -> float:
        """sigma_b: the std of adaptive clipping's noisy count (0 without noise: no privacy, no count noise)."""
        return COUNT_NOISE_SHARE * per_round if self.noise else 0.0

    def update_noise(self, per_round: int) -> float:
        """z_D, the multiplier of the average's noise: z, or with adaptive clipping (z^-2 - (2 sigma_b)^-2)^-1/2
        (module docstring)."""
        z = self.noise or 0.0
        if self.adaptive is None or z == 0:
            return z
        return (z ** -2 - (2 * self.count_std(per_round)) ** -2) ** -0.5

    def clip_at(self, state: GlobalState) -> float:
        """C_t: the clip of the round that starts from ``state`` (adaptive: carried in its extra)."""
        return float(state.extra.get(CLIP_KEY, self.clip)) if self.adaptive is not None else float(self.clip)

    def next_clip(self, clip: float, within: int, per_round: int, generator: torch.Generator) -> float:
        """C_{t+1} from C_t = ``clip`` and b_t = ``within`` of the round's ``per_round`` sampled clients at or
        below it: C_t exp(-eta (b~_t - GAMMA)), b~_t = (b_t + N(0, sigma_b^2)) / m."""
        noise = float(torch.randn((), generator=generator, dtype=torch.float64))
        share = (within + self.count_std(per_round) * noise) / per_round
        return clip * math.exp(-CLIP_LR * (share - self.adaptive))

    def check_dense(self, shapes: dict[str, tuple[int, int]], strategy: str | None = None) -> None:
        """Refuse where one module's dense noisy change and its SVD would not fit ``dense_mb`` (a product-space
        strategy; FACTOR_DP's noise is on the factors, never dense)."""
        if not self.on or not shapes or strategy in FACTOR_DP:
            return
        name, (d, k) = max(shapes.items(), key=lambda kv: kv[1][0] * kv[1][1])
        need = d * k * DENSE_BYTES_PER_ENTRY
        if need > self.dense_mb * 2**20:
            raise PrivacyError(
                f"--dp-clip adds dense noise to every module and re-decomposes it by SVD: {d} x {k} at {name} "
                f"needs {need / 2**20:.3g} MB, above --dp-dense-mb {self.dense_mb:g}; raise the budget")

    def std(self, per_round: int, clip: float | None = None) -> float:
        """sigma = z_D C / m: the noise's standard deviation on the average of m changes clipped to ``clip``
        (default: C = --dp-clip); z_D = z unless adaptive clipping takes its share (:meth:`update_noise`)."""
        return self.update_noise(per_round) * (self.clip if clip is None else clip) / per_round

    def epsilon(self, sampling_rate: float, rounds: int) -> float | None:
        """Epsilon spent after ``rounds`` rounds at ``delta`` (None: unbounded, i.e. no noise)."""
        eps = spent_epsilon(sampling_rate, self.noise or 0.0, rounds, self.delta)
        return None if math.isinf(eps) else eps

    def summary(self, sampling_rate: float, rounds: int) -> dict[str, float | None] | None:
        """What a finished run's summary.json adds (epsilon after ``rounds``, delta, z); None when DP is off."""
        if not self.on:
            return None
        return {"dp_epsilon": self.epsilon(sampling_rate, rounds), "dp_delta": self.delta, "dp_noise": self.noise}


def default_delta(clients: int) -> float:
    """1 / clients^1.1 (see the module docstring)."""
    return 1.0 / clients**1.1


def _event(q: float, z: float, rounds: int):
    import dp_accounting

    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)


def _accounting():
    try:
        import dp_accounting  # noqa: F401
    except ImportError:
        raise PrivacyError("--dp-clip needs dp-accounting: pip install 'hlora[privacy]'") from None
    from dp_accounting.rdp import RdpAccountant

    return lambda: RdpAccountant(list(ORDERS))


@functools.lru_cache(maxsize=4096)
def spent_epsilon(q: float, z: float, rounds: int, delta: float) -> float:
    """Epsilon at ``delta`` after ``rounds`` Poisson-subsampled Gaussian rounds (rate q, multiplier z), by
    dp-accounting's RDP accountant; inf without noise, 0 after no round."""
    if rounds <= 0:
        return 0.0
    if z <= 0:
        return math.inf
    accountant = _accounting()()
    accountant.compose(_event(q, z, rounds))
    return float(accountant.get_epsilon(delta))


@functools.lru_cache(maxsize=64)
def calibrate_noise(q: float, rounds: int, epsilon: float, delta: float) -> float:
    """The noise multiplier z whose ``spent_epsilon`` after ``rounds`` is at most ``epsilon``, by
    dp-accounting's calibration (a bracketed search over its accountant)."""
    import dp_accounting

    make = _accounting()
    try:
        z = float(dp_accounting.calibrate_dp_mechanism(make, lambda z: _event(q, z, rounds), epsilon, delta))
    except Exception as e:  # no z in the library's search bracket reaches the target
        raise PrivacyError(f"--dp-epsilon-target {epsilon:g} at delta {delta:g}: {e}") from None
    return z


def clip_scales(updates: list[Update], sent: list[Payload], clip: float,
                changes: list[dict[tuple[str, str], Tensor]] | None = None) -> dict[int, float]:
    """client id -> c_k < 1 for the clients whose ||Delta_k|| is above ``clip``: the change of s B A over modules
    and head (from the factors' Gram matrix), or, given a FACTOR_DP strategy's ``changes``
    (:func:`parameter_changes`), the norm of each client's change of the released factors."""
    if not updates:
        return {}
    if changes is not None:
        norms = [math.sqrt(sum(float(t.double().square().sum()) for t in d.values())) for d in changes]
    else:
        norms = change_gram(updates, sent).diagonal().clamp_min(0).sqrt().tolist()
    return {u.client: c for u, c in zip(updates, clip_factors(norms, clip)) if c < 1}


def trained_keys(state: GlobalState, payload: Payload) -> list[tuple[str, str]]:
    """The coordinates a round trains, as (kind, name): ("B", module) and ("A", module) per the payload's
    train_B / train_A (every client of a round gets the same), and ("h", head weight)."""
    kinds = [k for k, on in (("B", payload.train_B), ("A", payload.train_A)) if on]
    return [(k, m) for m in state.lora for k in kinds] + [("h", n) for n in state.head]


def _value(state: GlobalState, key: tuple[str, str]) -> Tensor:
    kind, name = key
    return state.head[name] if kind == "h" else getattr(state.lora[name], kind)


def parameter_changes(strategy: Strategy, state: GlobalState, updates: list[Update],
                      sent: list[Payload]) -> list[dict[tuple[str, str], Tensor]]:
    """Each client's change of the released factors: agg({u_k}) - agg({p_k}), the strategy's own aggregate of
    that client alone (weight 1) with its update against with what it was sent, on the round's trained
    coordinates (:func:`trained_keys`). A FACTOR_DP strategy's aggregate is affine in the one client's
    factors, so this is its update's contribution to the average at weight 1."""
    out = []
    for u, p in zip(updates, sent):
        one = dataclasses.replace(u, num_examples=1)
        after = strategy.aggregate(state, [one])
        before = strategy.aggregate(state, [dataclasses.replace(one, lora=p.lora, head=p.head)])
        out.append({key: _value(after, key) - _value(before, key) for key in trained_keys(state, p)})
    return out


def mean_change(trained: list[Factor], received: list[Factor], m: int, dtype: torch.dtype | None = None) -> Tensor:
    """(1 / m) sum_k (s_k B_k A_k - s0_k B0_k A0_k) as one dense d x k matrix (accumulated in place)."""
    dtype = dtype or trained[0].B.dtype
    D = torch.zeros(trained[0].B.shape[0], trained[0].A.shape[1], dtype=dtype)
    for f, f0 in zip(trained, received):
        D.addmm_(f.B.to(dtype), f.A.to(dtype), alpha=f.scale / m)
        D.addmm_(f0.B.to(dtype), f0.A.to(dtype), alpha=-f0.scale / m)
    return D


def add_noise(x: Tensor, std: float, generator: torch.Generator) -> Tensor:
    """x + N(0, std^2) in every entry, in place (drawn even at std 0, so the generator's stream stays the
    same whatever the noise)."""
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return x.add_(noise, alpha=std)


def truncated_svd(M: Tensor, rank: int) -> SVD:
    """The best rank-``rank`` approximation of a dense matrix (its leading singular triplets)."""
    U, S, Vt = torch.linalg.svd(M, full_matrices=False)
    return SVD(U[:, :rank].contiguous(), S[:rank].contiguous(), Vt[:rank].contiguous())


def noise_generator(seed: int, round: int, stream: int = NOISE_STREAM) -> torch.Generator:
    """The round's noise generator: seeded by (seed, round) alone (``stream``: CLIP_STREAM for the count of
    adaptive clipping)."""
    from hlora.server import client_seed

    return torch.Generator().manual_seed(client_seed(seed, round, -1, stream=stream))


def starting_point(strategy: Strategy, state: GlobalState, dispatched: Payload) -> GlobalState:
    """The factors the round's clients start from, in the state's coordinates: the state itself for ffa and
    rolora; for fedit the average of what it sends (its dispatch re-seeds A's rows whose column of B is zero,
    e.g. every rank in round 1; every fedit client has the same rank and scaling, so this is public)."""
    if strategy.name != "fedit":
        return state
    return strategy.aggregate(state, [Update(-1, dispatched.lora, dispatched.head, 1)])


def private_factor_step(strategy: Strategy, state: GlobalState, changes: list[dict[tuple[str, str], Tensor]],
                        scales: list[float], dispatched: Payload, *, per_round: int, std: float,
                        generator: torch.Generator, opt: ServerOpt | None = None) -> GlobalState:
    """A FACTOR_DP strategy's DP round from each client's change of the released factors (``changes``,
    :func:`parameter_changes`) and its clip factor c_k (``scales``; the aggregate is affine in one client's
    factors, so clipping its factors to X0 + c_k (X - X0) scales its change by c_k exactly): every trained
    coordinate (:func:`trained_keys` of ``dispatched``, any payload of the round) steps by
    D = (1 / ``per_round``) sum_k c_k Delta_k + N(0, std^2), with the server optimizer's tensor rule (avg: x + D).
    The noise is drawn coordinate by coordinate in the order of :func:`trained_keys`."""
    opt = opt or ServerOpt()
    moments = dict(state.extra.get(KEY, {}))
    keys = trained_keys(state, dispatched)
    start = starting_point(strategy, state, dispatched)
    D = {key: torch.zeros_like(_value(state, key)) for key in keys}
    for change, c in zip(changes, scales):
        for key, d in change.items():
            D[key].add_(d, alpha=c / per_round)
    new = {}
    for key in keys:
        x = _value(start, key)
        add_noise(D[key], std, generator)
        new[key] = x + D[key] if opt.name == "avg" else opt._tensor_step(moments, key, x, x + D[key])
    lora = {m: Factor(new.get(("B", m), f.B), new.get(("A", m), f.A), f.scale) for m, f in start.lora.items()}
    head = {n: new[("h", n)] for n in state.head}
    extra = dict(state.extra)
    if opt.name != "avg":
        extra[KEY] = moments
    return GlobalState(lora, head, state.init, state.round + 1, extra)


def private_step(state: GlobalState, updates: list[Update], sent: list[Payload], *, per_round: int, std: float,
                 generator: torch.Generator, opt: ServerOpt | None = None) -> GlobalState:
    """The global state after a DP round: ``updates`` are already clipped (answers to ``sent``), each weighs
    1 / ``per_round``; D_t (plus N(0, std^2)) steps G by the server optimizer's factored rule (module
    docstring). Product-space state only (a thin SVD per module)."""
    opt = opt or ServerOpt()
    momentum = opt.name != "avg" and opt.momentum > 0
    moments = dict(state.extra.get(KEY, {}))
    lr = 1.0 if opt.name == "avg" else opt.lr
    lora, dropped = {}, 0.0
    for name, G in state.lora.items():
        D = mean_change([u.lora[name] for u in updates], [p.lora[name] for p in sent], per_round, G.U.dtype) \
            if updates else torch.zeros(G.U.shape[0], G.Vt.shape[1], dtype=G.U.dtype)
        add_noise(D, std, generator)
        if momentum and ("m", name) in moments:
            D.add_(moments[("m", name)].dense(), alpha=opt.momentum)
        direction = truncated_svd(D, opt.rank)
        del D
        if momentum:
            moments[("m", name)] = direction
        lora[name], e = global_step(G, direction, lr, opt.rank)
        dropped = max(dropped, e)
    head = {}
    for n, h in state.head.items():
        dh = sum(((u.head[n] - p.head[n]) / per_round for u, p in zip(updates, sent)), torch.zeros_like(h))
        add_noise(dh, std, generator)
        head[n] = h + dh if opt.name == "avg" else opt._tensor_step(moments, ("h", n), h, h + dh)
    extra = {**state.extra, "server_energy_dropped": dropped}
    if opt.name != "avg":
        extra[KEY] = moments
    return GlobalState(lora, head, state.init, state.round + 1, extra)
