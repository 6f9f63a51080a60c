"""An idiomatic batched PyTorch peer of ``grapheme.Trainer.train_step``.

Not part of the package: the bench suite's peer (``bench_torch.PeerStepSuite``,
issue 14). One training step of what the Trainer computes with
``Embedding(dim)``, ``Encoder(dim, layers=2)``, ``Morpher(estimator="ste")``,
``StructuralLoss.for_training()`` and ``Adam`` on word-segmentation pairs,
written the way a PyTorch user writes it: the pairs padded into ``(B, L, d)``
tensors, every step a handful of batched tensor operations, autograd for the
whole backward pass, ``torch.optim.Adam``.

The step, per padded batch (``L`` the longest text, ``M`` the most segments):

1. **Lookup**: ``h = table[idx]`` through a dense code-point index built once
   (unknown code points read the last row), padding zeroed.
2. **Encoder**: ``layers`` times ``h <- h + tanh([h, P, S] W + b)`` (one
   ``Linear(3d, d)``: ``W_self``, ``W_pred``, ``W_succ`` stacked), ``P`` and
   ``S`` the predecessor and successor rows (a shift by one within each
   text); then ``q = h W_query``, ``k = h W_key``. Initialised as grapheme's:
   zero layers, identity projections.
3. **Scores**: ``s_i = cos(q_i, k_{i+1})``, ``tau = sigmoid(theta)``,
   ``p = sigmoid((s - tau) / T)``.
4. **Straight-through chain relaxation**: forward at the hard ``m = [s >
   tau]``, backward through ``p`` (``m = hard + (p - p.detach())``). The
   relaxed cluster means ``N_i / D_i`` with ``N_i = sum_{j >= i} T_ij h_j``,
   ``D_i = sum_j T_ij``, ``T_ij = prod_{t=i}^{j-1} m_t`` (a batched
   ``cumprod`` and ``bmm``: the recursion ``N_i = h_i + m_i N_{i+1}`` in matrix
   form), masses ``mu_i = 1 - m_{i-1}``; the expected out-degrees
   ``sum_j W_ij`` only when the degree cost has a weight (not in training).
5. **Structural loss** (node term; weights ``(type, act, deg) = (1, 0.2, 0)``
   as ``StructuralLoss.for_training()``): nodes labelled by their offsets
   (the Trainer's ``_by_position``), the target the gold segments' means of
   the same encoder features (gradient into them as well), cost
   ``type [l_i != l'_j] / 2 + act min(|x_i - y_j|, 1)``, a dustbin row and
   column of cost 1, entropic OT in the ``KL(P | a x b)`` form (masses
   multiply, never ``log a``: a zero mass keeps a finite gradient), padded
   batched log-domain Sinkhorn with grapheme's dustbin-balancing step, until
   the largest row-marginal error of the batch is at most ``tol`` (cap
   ``iterations``), autograd through every sweep. ``node = <P, C>``, the
   loss the mean over the pairs.
6. ``loss.backward()``, ``Adam.step()``.

It computes the same quantities as grapheme at the same sizes, not the same
numbers bit for bit: the batch runs until its slowest pair converges (padded
pairs share their sweeps), where grapheme stops every pair on its own.
"""
import numpy as np

try:
    import torch
    import torch.nn.functional as F
    _Module = torch.nn.Module
except ImportError:   # asv imports every module of bench/; the suite skips the peer
    torch = F = None
    _Module = object

__all__ = ["TorchPeer", "collate"]


def collate(inputs, targets, index, unknown):
    """Padded tensors of a batch of segmentation pairs (numpy, vectorised).

    ``inputs`` the texts, ``targets`` tuples of their segments; ``index`` a
    dense array from code point to table row, ``unknown`` the row of every
    code point beyond it. Returns a dict of tensors: ``idx`` (B, L) rows
    (0 on padding), ``mask`` (B, L), ``seg`` (B, L) the segment of every
    character (0 on padding), ``starts`` (B, M) the offset where every gold
    segment starts (-1 on padding), ``seg_len`` (B, M) (1 on padding),
    ``tmask`` (B, M), and ``chars``.
    """
    B = len(inputs)
    lengths = np.fromiter(map(len, inputs), np.int64, B)
    codes = np.frombuffer("".join(inputs).encode("utf-32-le"), np.uint32).astype(np.int64)
    rows = np.where(codes < index.shape[0], index[np.minimum(codes, index.shape[0] - 1)],
                    unknown)
    L = int(lengths.max())
    offsets = np.zeros(B + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    pair = np.repeat(np.arange(B), lengths)
    pos = np.arange(codes.shape[0]) - offsets[pair]
    idx = np.zeros((B, L), np.int64)
    idx[pair, pos] = rows
    mask = np.zeros((B, L), bool)
    mask[pair, pos] = True

    counts = np.fromiter(map(len, targets), np.int64, B)
    seg_len = np.fromiter((len(s) for t in targets for s in t), np.int64, int(counts.sum()))
    M = int(counts.max())
    seg_off = np.zeros(B + 1, np.int64)
    np.cumsum(counts, out=seg_off[1:])
    seg_pair = np.repeat(np.arange(B), counts)
    seg_pos = np.arange(seg_len.shape[0]) - seg_off[seg_pair]
    ends = np.cumsum(seg_len)
    starts_flat = ends - seg_len - offsets[seg_pair]      # offset within the text
    starts = np.full((B, M), -1, np.int64)
    starts[seg_pair, seg_pos] = starts_flat
    lens = np.ones((B, M), np.int64)
    lens[seg_pair, seg_pos] = seg_len
    tmask = np.zeros((B, M), bool)
    tmask[seg_pair, seg_pos] = True
    seg = np.zeros((B, L), np.int64)
    seg[pair, pos] = np.repeat(seg_pos, seg_len)           # segments tile the text
    return {"idx": torch.from_numpy(idx), "mask": torch.from_numpy(mask),
            "seg": torch.from_numpy(seg), "starts": torch.from_numpy(starts),
            "seg_len": torch.from_numpy(lens), "tmask": torch.from_numpy(tmask),
            "chars": int(lengths.sum())}


def _lse(x, w, dim):
    """``log sum w exp(x)`` along ``dim`` with the weights multiplying (never
    ``log w``), shifted by the detached maximum of ``x``."""
    top = x.amax(dim, keepdim=True).detach()
    return (top + torch.log((w * torch.exp(x - top)).sum(dim, keepdim=True))).squeeze(dim)


class TorchPeer(_Module):
    """The model and one training step (:meth:`step`) in PyTorch.

    Parameters
    ----------
    table : ndarray (V, d)
        Initial embedding rows (grapheme's, for the same starting point);
        the last row is the unknown one.
    codes : ndarray (V,)
        The code point of every row (the unknown row's is ignored).
    layers, threshold, temperature : as ``Encoder`` and ``Morpher``.
    epsilon, iterations, tol, weights, balance : as ``StructuralLoss``
        (``for_training``'s weights by default).
    lr : float, Adam's learning rate.
    dtype : torch.dtype, default float64 (grapheme's; see ``tol``).
    """

    def __init__(self, table, codes, layers=2, threshold=0.8, temperature=0.1,
                 epsilon=0.1, iterations=1000, tol=1e-6, weights=(1.0, 0.2, 0.0),
                 balance=True, lr=3e-3, dtype=None):
        if torch is None:
            raise ImportError("the PyTorch peer needs torch")
        super().__init__()
        dtype = torch.float64 if dtype is None else dtype
        V, d = table.shape
        self.emb = torch.nn.Embedding(V, d, dtype=dtype)
        with torch.no_grad():
            self.emb.weight.copy_(torch.as_tensor(np.asarray(table)))
        codes = np.asarray(codes, np.int64)
        known = codes < 0x110000
        self.unknown = int(np.flatnonzero(~known)[-1]) if (~known).any() else V - 1
        self.index = np.full(int(codes[known].max()) + 1 if known.any() else 1,
                             self.unknown, np.int64)
        self.index[codes[known]] = np.flatnonzero(known)
        self.layers = torch.nn.ModuleList(
            torch.nn.Linear(3 * d, d, dtype=dtype) for _ in range(layers))
        for layer in self.layers:
            torch.nn.init.zeros_(layer.weight)
            torch.nn.init.zeros_(layer.bias)
        self.query = torch.nn.Linear(d, d, bias=False, dtype=dtype)
        self.key = torch.nn.Linear(d, d, bias=False, dtype=dtype)
        with torch.no_grad():
            self.query.weight.copy_(torch.eye(d))
            self.key.weight.copy_(torch.eye(d))
        self.theta = torch.nn.Parameter(torch.tensor(float(threshold), dtype=dtype))
        self.temperature, self.epsilon = float(temperature), float(epsilon)
        self.iterations, self.tol, self.balance = int(iterations), tol, bool(balance)
        self.weights = tuple(float(w) for w in weights)
        self.dtype = dtype
        self.opt = torch.optim.Adam(self.parameters(), lr=lr)
        self.last_sweeps = 0
        self.last_error = float("nan")

    # ------------------------------------------------------------------ model
    def encode(self, idx, mask):
        """Encoder features, queries and keys, (B, L, d) each."""
        keep = mask.unsqueeze(-1).to(self.dtype)
        h = self.emb(idx) * keep
        for layer in self.layers:
            pred = F.pad(h[:, :-1], (0, 0, 1, 0))      # row i-1 (0 at the start)
            succ = F.pad(h[:, 1:], (0, 0, 0, 1))       # row i+1 (0 past the end: padding)
            h = (h + torch.tanh(layer(torch.cat([h, pred, succ], dim=-1)))) * keep
        return h, self.query(h), self.key(h)

    def merge_weights(self, q, k, mask):
        """Straight-through ``m`` (B, L): hard ``[s > tau]`` forward, the
        gradient of ``p`` backward; 0 where no edge leaves the node."""
        s = F.cosine_similarity(q[:, :-1], k[:, 1:], dim=-1, eps=1e-12)
        tau = torch.sigmoid(self.theta)
        p = torch.sigmoid((s - tau) / self.temperature)
        edge = (mask[:, 1:] & mask[:, :-1]).to(self.dtype)
        m = ((s > tau).to(self.dtype) + (p - p.detach())) * edge
        return F.pad(m, (0, 1))

    @staticmethod
    def relax(h, m, mask):
        """Relaxed chain merge: features ``N / D`` (B, L, d), masses ``mu``
        (B, L), and the prefix products ``T`` (B, L, L)."""
        B, L, _ = h.shape
        upper = torch.ones(L, L, dtype=torch.bool).triu()        # j >= i
        factors = torch.where(upper, m.unsqueeze(1), torch.ones((), dtype=m.dtype))
        prods = torch.cumprod(factors, dim=-1)                    # prod_{t=i}^{j} m_t
        T = F.pad(prods[..., :-1], (1, 0), value=1.0) * upper     # prod_{t=i}^{j-1} m_t
        features = torch.bmm(T, h) / T.sum(-1, keepdim=True)
        mass = (1.0 - F.pad(m[:, :-1], (1, 0))) * mask.to(m.dtype)
        return features, mass, T

    @staticmethod
    def degrees(T, m, mass, mask):
        """Expected weighted out-degrees ``sum_{j > i} W_ij``,
        ``W_ij = mu_i T_{i,j-1} (1 - m_{j-1})`` (j a node of the chain)."""
        stop = F.pad(1.0 - m[:, :-1], (1, 0)) * mask.to(m.dtype)     # (1 - m_{j-1}), j real
        before = F.pad(T[..., :-1], (1, 0))                           # T_{i, j-1}; 0 at j = 0
        strict = torch.ones(T.shape[-1], T.shape[-1], dtype=torch.bool).triu(1)
        return mass * (before * stop.unsqueeze(1) * strict).sum(-1)

    def sinkhorn(self, C, a, b):
        """Log-domain Sinkhorn of the augmented problems (B, n+1, m+1) with
        masses ``a`` (B, n+1), ``b`` (B, m+1), the dustbins last; returns the
        potentials. Every sweep is recorded by autograd."""
        eps = self.epsilon
        Ce = C / eps
        f, g = None, torch.zeros_like(b)   # f: set by the first sweep
        for t in range(self.iterations):
            if self.balance and t > 0:
                g = self._balanced(f, g, Ce, a, b)
            f = -eps * _lse((g / eps).unsqueeze(1) - Ce, b.unsqueeze(1), 2)
            g = -eps * _lse((f / eps).unsqueeze(2) - Ce, a.unsqueeze(2), 1)
            if self.tol is not None:
                with torch.no_grad():   # the row error of (f, g), as grapheme's stopping rule
                    fn = -eps * _lse((g / eps).unsqueeze(1) - Ce, b.unsqueeze(1), 2)
                    err = float((a * torch.expm1((f - fn) / eps)).abs().max())
                if err <= self.tol:
                    break
        self.last_sweeps, self.last_error = t + 1, err if self.tol is not None else float("nan")
        return f, g

    def _balanced(self, f, g, Ce, a, b):
        """grapheme's dustbin-balancing step: the exact dual ascent along
        ``f += c`` (real rows), ``g -= c`` (real columns); returns the new g."""
        eps = self.epsilon
        # deletion mass s (real rows -> dustbin column), insertion mass r
        s = b[:, -1] * (a[:, :-1] * torch.exp((f[:, :-1] + g[:, -1:]) / eps
                                              - Ce[:, :-1, -1])).sum(-1)
        r = a[:, -1] * (b[:, :-1] * torch.exp((f[:, -1:] + g[:, :-1]) / eps
                                              - Ce[:, -1, :-1])).sum(-1)
        d = b[:, -1] - a[:, -1]                                     # A - B
        R = torch.sqrt(d * d + 4.0 * s * r)
        ok = (s > 0) & (r > 0)
        tiny = torch.finfo(s.dtype).tiny
        x = torch.where(d >= 0, (d + R) / (2.0 * s).clamp_min(tiny),
                        2.0 * r / (R - d).clamp_min(tiny))
        c = torch.where(ok, eps * torch.log(torch.where(ok, x, torch.ones_like(x))),
                        torch.zeros_like(x))
        return torch.cat([g[:, :-1] - c.unsqueeze(1), g[:, -1:]], dim=1)

    def loss(self, batch):
        """The batch's mean structural loss (node term), differentiable."""
        idx, mask, tmask = batch["idx"], batch["mask"], batch["tmask"]
        dt = self.dtype
        h, q, k = self.encode(idx, mask)
        m = self.merge_weights(q, k, mask)
        features, mass, T = self.relax(h, m, mask)
        x = features.mean(-1)                                   # activations (B, L)
        # target: gold segment means of the same features (activation = mean)
        act = h.mean(-1) * mask.to(dt)
        y = torch.zeros(tmask.shape, dtype=dt).scatter_add(1, batch["seg"], act)
        y = y / batch["seg_len"].to(dt)
        w_type, w_act, w_deg = self.weights
        L = idx.shape[1]
        offsets = torch.arange(L).unsqueeze(0).unsqueeze(-1)     # labels: offsets
        C = w_type * 0.5 * (offsets != batch["starts"].unsqueeze(1)).to(dt)
        C = C + w_act * (x.unsqueeze(-1) - y.unsqueeze(1)).abs().clamp(max=1.0)
        if w_deg:
            dp = self.degrees(T, m, mass, mask)
            dtg = (torch.arange(tmask.shape[1]).unsqueeze(0) < tmask.sum(1, keepdim=True) - 1
                   ).to(dt)                                         # target chain: 1, .., 1, 0
            dp_, dt_ = dp.unsqueeze(-1), dtg.unsqueeze(1)
            C = C + w_deg * (dp_ - dt_).abs() / torch.maximum(torch.maximum(dp_, dt_),
                                                              torch.ones((), dtype=dt))
        C = F.pad(C, (0, 1, 0, 1), value=1.0)                   # dustbins cost 1
        corner = torch.ones_like(C[0])
        corner[-1, -1] = 0.0                                     # dustbin to dustbin 0
        C = C * corner
        a = mass
        b = tmask.to(dt)
        a = torch.cat([a, b.sum(1, keepdim=True)], dim=1)        # dustbin row: B = sum b
        b = torch.cat([b, mass.sum(1, keepdim=True)], dim=1)     # dustbin column: A = sum a
        f, g = self.sinkhorn(C, a, b)
        plan = a.unsqueeze(2) * b.unsqueeze(1) * torch.exp(
            (f.unsqueeze(2) + g.unsqueeze(1) - C) / self.epsilon)
        return (plan * C).sum((1, 2)).mean()

    def collate(self, inputs, targets):
        return collate(inputs, targets, self.index, self.unknown)

    def step(self, inputs, targets):
        """One optimisation step from the texts; returns the loss (float)."""
        batch = self.collate(inputs, targets)
        self.opt.zero_grad()
        loss = self.loss(batch)
        loss.backward()
        self.opt.step()
        return float(loss.detach())
