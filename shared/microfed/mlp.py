# A model with one hidden layer in Q16.16, pinned like the softmax regression (docs/model.md,
# "The MLP"): ReLU hidden units, the same fixed-point softmax, cross-entropy, mini-batch SGD
# with deterministic backpropagation. Portable (CPython, MicroPython), integer only: every
# product is accumulated exactly and rounded once, like model.SoftmaxRegression.
#
# Layout of the flat parameter vector of MLP(d features, h hidden units, k classes):
#   params[i * d + j]            W1: weight of hidden unit i for feature j (row-major by unit)
#   params[h * d + i]            b1: bias of hidden unit i
#   params[h * d + h + c * h + i] W2: weight of class c for hidden unit i
#   params[h * d + h + k * h + c] b2: bias of class c
# For the digits task with h = 32: 2048 + 32 + 320 + 10 = 2410 parameters.
#
# Imported by model.get("mlp") only: a node that runs the softmax model never loads it.

from microfed.model import (
    Model,
    ModelError,
    XorShift32,
    _held,
    _nonzero,
    _samples,
    batches,
    softmax,
)
from microfed.q16 import MAX_RAW, MIN_RAW, ONE, exact_list, sat


def _step(p, o, g, num, den2, half):
    # p[o] <- sat(p[o] - round_half_up(num * g / den)), den2 = 2 * den, half = den.
    v = p[o] - (2 * num * g + half) // den2
    p[o] = MAX_RAW if v > MAX_RAW else (MIN_RAW if v < MIN_RAW else v)


class MLP(Model):
    name = "mlp"
    # Init: weights uniform in [-A, A] raw, biases 0; A about sqrt(6 / (fan_in + fan_out))
    # (Glorot) for the digits sizes: 0.25 for W1 (64 -> 32), 0.35 for W2 (32 -> 10).
    INIT_AMP1 = 16384
    INIT_AMP2 = 22938

    def __init__(self, n_features=64, n_hidden=32, n_classes=10):
        if n_features < 1 or n_hidden < 1 or n_classes < 2:
            raise ModelError("mlp needs n_features >= 1, n_hidden >= 1 and n_classes >= 2")
        self.d = n_features
        self.h = n_hidden
        self.k = n_classes
        self.o_b1 = n_hidden * n_features
        self.o_w2 = self.o_b1 + n_hidden
        self.o_b2 = self.o_w2 + n_classes * n_hidden
        self.n_params = self.o_b2 + n_classes

    def init(self, seed):
        # W1 from the generator, then W2; filled into one list (concatenating would need two
        # 9.6 KB blocks at once, which a board's heap may not have).
        rng = XorShift32(seed)
        p = [0] * self.n_params
        s1 = 2 * self.INIT_AMP1 + 1
        for t in range(self.h * self.d):
            p[t] = rng.next() % s1 - self.INIT_AMP1
        s2 = 2 * self.INIT_AMP2 + 1
        for t in range(self.o_w2, self.o_b2):
            p[t] = rng.next() % s2 - self.INIT_AMP2
        return p

    def _forward(self, p, x, nz, shift):
        # a_i = sat(b1_i + round_half_up(sum_j W1_ij x_j / 2^16)), r_i = max(0, a_i);
        # z_c = sat(b2_c + round_half_up(sum_i W2_ci r_i / 2^16)). Returns (a, r, z).
        d, h = self.d, self.h
        a = []
        for i in range(h):
            o = i * d
            acc = 0
            for j in nz:
                acc += p[o + j] * x[j]
            a.append(sat(p[self.o_b1 + i] + (((acc << shift) + 32768) >> 16)))
        r = [v if v > 0 else 0 for v in a]
        z = []
        for c in range(self.k):
            o = self.o_w2 + c * h
            acc = 0
            for i in range(h):
                if r[i]:
                    acc += p[o + i] * r[i]
            z.append(sat(p[self.o_b2 + c] + ((acc + 32768) >> 16)))
        return a, r, z

    def logits(self, params, x):
        if len(x) != self.d:
            raise ModelError("sample has %d features, expected %d" % (len(x), self.d))
        return self._forward(params, x, _nonzero(x), 0)[2]

    def scratch_len(self):
        # The batch's gradient sums, one per parameter, laid out like the parameters.
        return self.n_params

    def train(self, params, data, cfg, out=None, scratch=None, order=None, spare=None):
        # Per batch of m samples, with the parameters held fixed over the batch, per sample:
        #   g_c   = p_c - ONE*[c == y]                                  (Q16.16)
        #   dh_i  = [a_i > 0] * round_half_up(sum_c W2_ci * g_c / 2^16)  (Q16.16, ReLU's
        #           derivative taken as 0 at a_i = 0)
        # summed over the batch exactly: GW2_ci = sum g_c r_i, Gb2_c = sum g_c,
        # GW1_ij = sum dh_i x_j, Gb1_i = sum dh_i; then every parameter
        #   theta <- sat(theta - round_half_up(lr * G / (m * 2^32)))  (weights: G at 2^32)
        #   theta <- sat(theta - round_half_up(lr * G / (m * 2^16)))  (biases: G at 2^16)
        # Sample order and batches as in SoftmaxRegression.train. `out` and `scratch` (the
        # sums, scratch_len() of them): lists a board allocates once, before its data, so that
        # no 9.6 KB block has to be found mid-run (the result is the same without them).
        self.check_params(params)
        self.check_data(data)
        row, label, n, shift = _samples(data)
        d, h, k = self.d, self.h, self.k
        o_b1, o_w2, o_b2 = self.o_b1, self.o_w2, self.o_b2
        p = _held(out, self.n_params, "out")
        if p is None:
            p = exact_list(params)
        elif p is not params:
            p[:] = params
        gs = _held(scratch, self.n_params, "scratch")
        if gs is None:
            gs = [0] * self.n_params
        else:
            for t in range(self.n_params):
                gs[t] = 0  # an earlier call that failed mid-batch leaves sums behind
        # gs[:o_b1], W1's sums, are at 2^(32 - shift): x_j = b_j << shift is summed as b_j.
        for batch in batches(n, cfg, order):
            for i in batch:
                x = row(i)
                if not isinstance(x, list):
                    x = bytes(x)
                nz = _nonzero(x)
                a, r, z = self._forward(p, x, nz, shift)
                g = softmax(z)
                g[label(i)] -= ONE
                for c in range(k):
                    gc = g[c]
                    if gc:
                        gs[o_b2 + c] += gc
                        o = o_w2 + c * h
                        for u in range(h):
                            if r[u]:
                                gs[o + u] += gc * r[u]
                for u in range(h):
                    if a[u] <= 0:
                        continue
                    acc = 0
                    for c in range(k):
                        if g[c]:
                            acc += p[o_w2 + c * h + u] * g[c]
                    du = (acc + 32768) >> 16
                    if du:
                        gs[o_b1 + u] += du
                        o = u * d
                        for j in nz:
                            gs[o + j] += du * x[j]
            self._apply(p, gs, cfg.lr, len(batch), shift)
        return p

    def _apply(self, p, gs, lr, m, shift):
        # One SGD step from the batch's sums; every sum is zeroed as it is consumed. Weights'
        # sums are at 2^32 (W1's at 2^(32 - shift)), biases' at 2^16.
        mw = m << 32
        mb = m << 16
        for lo, hi, num, half in ((0, self.o_b1, lr << shift, mw), (self.o_b1, self.o_w2, lr, mb),
                                  (self.o_w2, self.o_b2, lr, mw),
                                  (self.o_b2, self.n_params, lr, mb)):
            for t in range(lo, hi):
                g = gs[t]
                if g:
                    _step(p, t, g, num, half << 1, half)
                    gs[t] = 0
