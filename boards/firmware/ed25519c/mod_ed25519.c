// `_ed25519`: Ed25519 (RFC 8032, "pure") and the SHA-512 it hashes with, in C, for the
// firmware microfed builds (boards/firmware/manifest.py: c_module). microfed.ed25519 uses it
// when the firmware has it and microfed.ed25519_py (Python big ints) everywhere else.
//
//     public_key(seed32) -> bytes (32)
//     sign(seed32, msg, pub=None) -> bytes (64)
//     verify(pub32, msg, sig64) -> bool      (False for any malformed input, never raises)
//
// Why C: on a 32-bit MicroPython each big-int field operation allocates, and one verification
// needed ~4 KB of free heap in blocks of five (docs/results.md): more than a 32 KB node has
// left. Here everything lives on the C stack; the only heap block is the
// result. The same acceptance rule as microfed.ed25519_py and OpenSSL: S < L, a canonical
// public key that decodes, and encode([S]B - [k]A) equal to the R bytes (cofactorless);
// tests/test_ed25519.py runs its MicroPython cases on both, against `cryptography`.
//
// Field elements: 16 signed 32-bit limbs of 16 bits (TweetNaCl's representation), products
// in 64 bits. Points: extended coordinates (X, Y, Z, T) with the complete a = -1 addition
// (add-2008-hwcd-3), which also doubles. Not constant time, like the Python implementation:
// a device's signing key is as exposed to timing as its interpreter (docs/ed25519.md).

#include <stdint.h>
#include <string.h>

#include "py/obj.h"
#include "py/objstr.h"
#include "py/runtime.h"

typedef int32_t fe[16];
typedef int64_t i64;

// --- SHA-512 (FIPS 180-4) ------------------------------------------------------------

static const uint64_t sha512_k[80] = {
    0x428a2f98d728ae22ULL, 0x7137449123ef65cdULL, 0xb5c0fbcfec4d3b2fULL, 0xe9b5dba58189dbbcULL,
    0x3956c25bf348b538ULL, 0x59f111f1b605d019ULL, 0x923f82a4af194f9bULL, 0xab1c5ed5da6d8118ULL,
    0xd807aa98a3030242ULL, 0x12835b0145706fbeULL, 0x243185be4ee4b28cULL, 0x550c7dc3d5ffb4e2ULL,
    0x72be5d74f27b896fULL, 0x80deb1fe3b1696b1ULL, 0x9bdc06a725c71235ULL, 0xc19bf174cf692694ULL,
    0xe49b69c19ef14ad2ULL, 0xefbe4786384f25e3ULL, 0x0fc19dc68b8cd5b5ULL, 0x240ca1cc77ac9c65ULL,
    0x2de92c6f592b0275ULL, 0x4a7484aa6ea6e483ULL, 0x5cb0a9dcbd41fbd4ULL, 0x76f988da831153b5ULL,
    0x983e5152ee66dfabULL, 0xa831c66d2db43210ULL, 0xb00327c898fb213fULL, 0xbf597fc7beef0ee4ULL,
    0xc6e00bf33da88fc2ULL, 0xd5a79147930aa725ULL, 0x06ca6351e003826fULL, 0x142929670a0e6e70ULL,
    0x27b70a8546d22ffcULL, 0x2e1b21385c26c926ULL, 0x4d2c6dfc5ac42aedULL, 0x53380d139d95b3dfULL,
    0x650a73548baf63deULL, 0x766a0abb3c77b2a8ULL, 0x81c2c92e47edaee6ULL, 0x92722c851482353bULL,
    0xa2bfe8a14cf10364ULL, 0xa81a664bbc423001ULL, 0xc24b8b70d0f89791ULL, 0xc76c51a30654be30ULL,
    0xd192e819d6ef5218ULL, 0xd69906245565a910ULL, 0xf40e35855771202aULL, 0x106aa07032bbd1b8ULL,
    0x19a4c116b8d2d0c8ULL, 0x1e376c085141ab53ULL, 0x2748774cdf8eeb99ULL, 0x34b0bcb5e19b48a8ULL,
    0x391c0cb3c5c95a63ULL, 0x4ed8aa4ae3418acbULL, 0x5b9cca4f7763e373ULL, 0x682e6ff3d6b2b8a3ULL,
    0x748f82ee5defb2fcULL, 0x78a5636f43172f60ULL, 0x84c87814a1f0ab72ULL, 0x8cc702081a6439ecULL,
    0x90befffa23631e28ULL, 0xa4506cebde82bde9ULL, 0xbef9a3f7b2c67915ULL, 0xc67178f2e372532bULL,
    0xca273eceea26619cULL, 0xd186b8c721c0c207ULL, 0xeada7dd6cde0eb1eULL, 0xf57d4f7fee6ed178ULL,
    0x06f067aa72176fbaULL, 0x0a637dc5a2c898a6ULL, 0x113f9804bef90daeULL, 0x1b710b35131c471bULL,
    0x28db77f523047d84ULL, 0x32caab7b40c72493ULL, 0x3c9ebe0a15c9bebcULL, 0x431d67c49c100d4cULL,
    0x4cc5d4becb3e42b6ULL, 0x597f299cfc657e2aULL, 0x5fcb6fab3ad6faecULL, 0x6c44198c4a475817ULL,
};

typedef struct {
    uint64_t h[8];
    uint8_t buf[128];
    size_t fill;  // bytes in buf
    uint64_t n;  // bytes hashed so far
} sha512_ctx;

static uint64_t rotr(uint64_t x, int n) {
    return (x >> n) | (x << (64 - n));
}

static uint64_t load_be64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) {
        v = (v << 8) | p[i];
    }
    return v;
}

static void sha512_block(uint64_t h[8], const uint8_t *p) {
    uint64_t w[16];  // rolling schedule: w[t & 15] holds W[t]
    uint64_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
    for (int t = 0; t < 80; t++) {
        uint64_t wt;
        if (t < 16) {
            wt = w[t] = load_be64(p + 8 * t);
        } else {
            uint64_t x = w[(t - 15) & 15], y = w[(t - 2) & 15];
            wt = w[t & 15] += w[(t - 7) & 15] + (rotr(x, 1) ^ rotr(x, 8) ^ (x >> 7))
                + (rotr(y, 19) ^ rotr(y, 61) ^ (y >> 6));
        }
        uint64_t t1 = hh + (rotr(e, 14) ^ rotr(e, 18) ^ rotr(e, 41)) + (g ^ (e & (f ^ g)))
            + sha512_k[t] + wt;
        uint64_t t2 = (rotr(a, 28) ^ rotr(a, 34) ^ rotr(a, 39)) + ((a & b) | (c & (a | b)));
        hh = g;
        g = f;
        f = e;
        e = d + t1;
        d = c;
        c = b;
        b = a;
        a = t1 + t2;
    }
    h[0] += a;
    h[1] += b;
    h[2] += c;
    h[3] += d;
    h[4] += e;
    h[5] += f;
    h[6] += g;
    h[7] += hh;
}

static void sha512_init(sha512_ctx *s) {
    static const uint64_t h0[8] = {
        0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL, 0xa54ff53a5f1d36f1ULL,
        0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL, 0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL,
    };
    memcpy(s->h, h0, sizeof(h0));
    s->fill = 0;
    s->n = 0;
}

static void sha512_update(sha512_ctx *s, const uint8_t *p, size_t len) {
    s->n += len;
    while (len > 0) {
        if (s->fill == 0 && len >= 128) {
            sha512_block(s->h, p);
            p += 128;
            len -= 128;
            continue;
        }
        size_t take = 128 - s->fill;
        if (take > len) {
            take = len;
        }
        memcpy(s->buf + s->fill, p, take);
        s->fill += take;
        p += take;
        len -= take;
        if (s->fill == 128) {
            sha512_block(s->h, s->buf);
            s->fill = 0;
        }
    }
}

static void sha512_final(sha512_ctx *s, uint8_t out[64]) {
    uint64_t bits = s->n * 8;
    s->buf[s->fill++] = 0x80;
    if (s->fill > 112) {
        memset(s->buf + s->fill, 0, 128 - s->fill);
        sha512_block(s->h, s->buf);
        s->fill = 0;
    }
    memset(s->buf + s->fill, 0, 128 - s->fill);
    for (int i = 0; i < 8; i++) {  // the length's high 64 bits stay zero
        s->buf[127 - i] = (uint8_t)(bits >> (8 * i));
    }
    sha512_block(s->h, s->buf);
    for (int i = 0; i < 64; i++) {
        out[i] = (uint8_t)(s->h[i >> 3] >> (56 - 8 * (i & 7)));
    }
}

// --- field: GF(2^255 - 19) -------------------------------------------------------------

static const fe fe_d = {0x78a3, 0x1359, 0x4dca, 0x75eb, 0xd8ab, 0x4141, 0x0a4d, 0x0070,
                        0xe898, 0x7779, 0x4079, 0x8cc7, 0xfe73, 0x2b6f, 0x6cee, 0x5203};
static const fe fe_d2 = {0xf159, 0x26b2, 0x9b94, 0xebd6, 0xb156, 0x8283, 0x149a, 0x00e0,
                         0xd130, 0xeef3, 0x80f2, 0x198e, 0xfce7, 0x56df, 0xd9dc, 0x2406};
static const fe fe_sqrtm1 = {0xa0b0, 0x4a0e, 0x1b27, 0xc4ee, 0xe478, 0xad2f, 0x1806, 0x2f43,
                             0xd7a7, 0x3dfb, 0x0099, 0x2b4d, 0xdf0b, 0x4fc1, 0x2480, 0x2b83};

static void fe_set(fe o, int32_t v) {
    memset(o, 0, sizeof(fe));
    o[0] = v;
}

static void fe_copy(fe o, const fe a) {
    memcpy(o, a, sizeof(fe));
}

// One carry pass: limbs 0..14 end in [0, 2^16); limb 15's carry wraps round as 38 = 2^256 mod p.
static void fe_carry(fe o) {
    for (int i = 0; i < 16; i++) {
        int32_t c = o[i] >> 16;  // floor division (arithmetic shift)
        o[i] -= c * 65536;
        if (i < 15) {
            o[i + 1] += c;
        } else {
            o[0] += 38 * c;
        }
    }
}

static void fe_add(fe o, const fe a, const fe b) {
    for (int i = 0; i < 16; i++) {
        o[i] = a[i] + b[i];
    }
}

static void fe_sub(fe o, const fe a, const fe b) {
    for (int i = 0; i < 16; i++) {
        o[i] = a[i] - b[i];
    }
}

// The field multiplication is nearly all of the instructions: compiled for speed, its
// column loops unrolled (the ports build with -Os; on the Cortex-M3 the rolled loops took
// ~8 instructions per 32x32->64 multiply-accumulate).
#define FE_FAST __attribute__((optimize("O2")))

// t = o's 31 columns folded and carried into o (limbs 0..15, as fe_carry leaves them).
static void FE_FAST fe_reduce(fe o, i64 t[31]) {
    #pragma GCC unroll 15
    for (int k = 0; k < 15; k++) {
        t[k] += 38 * t[k + 16];
    }
    #pragma GCC unroll 2
    for (int pass = 0; pass < 2; pass++) {
        #pragma GCC unroll 16
        for (int i = 0; i < 16; i++) {
            i64 c = t[i] >> 16;
            t[i] -= c * 65536;
            if (i < 15) {
                t[i + 1] += c;
            } else {
                t[0] += 38 * c;
            }
        }
    }
    for (int i = 0; i < 16; i++) {
        o[i] = (int32_t)t[i];
    }
}

// o = a * b. Inputs are at most sums or differences of two carried elements (|limb| < 2^18):
// a column sums 16 products below 2^36, the fold by 38 stays below 2^47.
static void FE_FAST fe_mul(fe o, const fe a, const fe b) {
    i64 t[31];
    #pragma GCC unroll 31
    for (int k = 0; k < 31; k++) {
        i64 acc = 0;
        #pragma GCC unroll 16
        for (int i = k < 16 ? 0 : k - 15; i <= (k < 16 ? k : 15); i++) {
            acc += (i64)a[i] * b[k - i];
        }
        t[k] = acc;
    }
    fe_reduce(o, t);
}

// o = a^2: each cross product once, doubled (136 products instead of 256).
static void FE_FAST fe_sq(fe o, const fe a) {
    i64 t[31];
    #pragma GCC unroll 31
    for (int k = 0; k < 31; k++) {
        i64 acc = 0;
        int lo = k < 16 ? 0 : k - 15;
        #pragma GCC unroll 8
        for (int i = lo; i < k - i; i++) {
            acc += (i64)a[i] * a[k - i];
        }
        acc += acc;
        if (!(k & 1)) {
            acc += (i64)a[k >> 1] * a[k >> 1];
        }
        t[k] = acc;
    }
    fe_reduce(o, t);
}

// o = a^(2^n), n >= 1.
static void fe_sqn(fe o, const fe a, int n) {
    fe_sq(o, a);
    for (int i = 1; i < n; i++) {
        fe_sq(o, o);
    }
}

// t = z^(2^250 - 1) and z11 = z^11: ref10's addition chain (250 squarings, 11 products),
// as microfed.ed25519_py's _pow250.
static void fe_pow250(fe t, fe z11, const fe z) {
    fe z2, z9, t10, t50, x;
    fe_sq(z2, z);
    fe_sqn(x, z2, 2);
    fe_mul(z9, x, z);
    fe_mul(z11, z9, z2);
    fe_sq(x, z11);
    fe_mul(t, x, z9);  // 2^5 - 1
    fe_sqn(x, t, 5);
    fe_mul(t, x, t);  // 2^10 - 1
    fe_copy(t10, t);
    fe_sqn(x, t, 10);
    fe_mul(t, x, t);  // 2^20 - 1
    fe_sqn(x, t, 20);
    fe_mul(t, x, t);  // 2^40 - 1
    fe_sqn(x, t, 10);
    fe_mul(t, x, t10);  // 2^50 - 1
    fe_copy(t50, t);
    fe_sqn(x, t, 50);
    fe_mul(t, x, t);  // 2^100 - 1
    fe_sqn(x, t, 100);
    fe_mul(t, x, t);  // 2^200 - 1
    fe_sqn(x, t, 50);
    fe_mul(t, x, t50);  // 2^250 - 1
}

// z^(2^255 - 21) = 1/z.
static void fe_inv(fe o, const fe z) {
    fe t, z11;
    fe_pow250(t, z11, z);
    fe_sqn(t, t, 5);
    fe_mul(o, t, z11);
}

// z^(2^252 - 3), for the square root in decoding.
static void fe_pow2523(fe o, const fe z) {
    fe t, z11;
    fe_pow250(t, z11, z);
    fe_sqn(t, t, 2);
    fe_mul(o, t, z);
}

// The canonical 32 bytes (value mod p, little-endian).
static void fe_pack(uint8_t out[32], const fe n) {
    fe t, m;
    fe_copy(t, n);
    fe_carry(t);
    fe_carry(t);
    fe_carry(t);
    // Now 0 <= t < 2^256 = 2p + 38: subtract p at most twice.
    for (int pass = 0; pass < 2; pass++) {
        m[0] = t[0] - 0xffed;
        for (int i = 1; i < 15; i++) {
            m[i] = t[i] - 0xffff - ((m[i - 1] >> 16) & 1);
            m[i - 1] &= 0xffff;
        }
        m[15] = t[15] - 0x7fff - ((m[14] >> 16) & 1);
        int borrow = (m[15] >> 16) & 1;
        m[14] &= 0xffff;
        if (!borrow) {
            fe_copy(t, m);
        }
    }
    for (int i = 0; i < 16; i++) {
        out[2 * i] = (uint8_t)t[i];
        out[2 * i + 1] = (uint8_t)(t[i] >> 8);
    }
}

static void fe_unpack(fe o, const uint8_t in[32]) {  // bit 255 ignored
    for (int i = 0; i < 16; i++) {
        o[i] = in[2 * i] | ((int32_t)in[2 * i + 1] << 8);
    }
    o[15] &= 0x7fff;
}

static int fe_equal(const fe a, const fe b) {
    uint8_t x[32], y[32];
    fe_pack(x, a);
    fe_pack(y, b);
    return memcmp(x, y, 32) == 0;
}

static int fe_parity(const fe a) {
    uint8_t x[32];
    fe_pack(x, a);
    return x[0] & 1;
}

static int fe_is_zero(const fe a) {
    static const uint8_t zero[32];
    uint8_t x[32];
    fe_pack(x, a);
    return memcmp(x, zero, 32) == 0;
}

// --- points ----------------------------------------------------------------------------

typedef struct {
    fe x, y, z, t;
} point;

static void pt_identity(point *p) {
    fe_set(p->x, 0);
    fe_set(p->y, 1);
    fe_set(p->z, 1);
    fe_set(p->t, 0);
}

// p += q (add-2008-hwcd-3, complete on Ed25519; q may be p itself: every read of q comes
// before the first write to p).
static void pt_add(point *p, const point *q) {
    fe a, b, c, d, e, f, g, h;
    fe_sub(a, p->y, p->x);
    fe_sub(h, q->y, q->x);
    fe_mul(a, a, h);
    fe_add(b, p->x, p->y);
    fe_add(h, q->x, q->y);
    fe_mul(b, b, h);
    fe_mul(c, p->t, q->t);
    fe_mul(c, c, fe_d2);
    fe_mul(d, p->z, q->z);
    fe_add(d, d, d);
    fe_sub(e, b, a);
    fe_sub(f, d, c);
    fe_add(g, d, c);
    fe_add(h, b, a);
    fe_mul(p->x, e, f);
    fe_mul(p->y, h, g);
    fe_mul(p->z, g, f);
    fe_mul(p->t, e, h);
}

// p = 2p: dbl-2008-hwcd with a = -1 (4 squarings and 4 multiplications, where pt_add(p, p)
// takes 9 multiplications), the result scaled by -1 (the same point in extended
// coordinates), which saves negating: with A = X^2, B = Y^2, C = 2Z^2, E = 2XY, G = B - A,
// F = G - C, H = -A - B the double is (EF : GH : FG : EH); this computes
// (E(-F) : G(-H) : (-F)G : E(-H)).
static void pt_dbl(point *p) {
    fe a, b, c, e, f, g, h;
    fe_sq(a, p->x);
    fe_sq(b, p->y);
    fe_sq(c, p->z);
    fe_add(c, c, c);  // C
    fe_add(e, p->x, p->y);
    fe_sq(e, e);
    fe_sub(e, e, a);
    fe_sub(e, e, b);  // E = (X + Y)^2 - A - B
    fe_sub(g, b, a);  // G
    fe_sub(f, c, g);  // -F
    fe_add(h, a, b);  // -H
    fe_mul(p->x, e, f);
    fe_mul(p->y, g, h);
    fe_mul(p->z, f, g);
    fe_mul(p->t, e, h);
}

static void pt_encode(uint8_t out[32], const point *p) {
    fe zi, x, y;
    fe_inv(zi, p->z);
    fe_mul(x, p->x, zi);
    fe_mul(y, p->y, zi);
    fe_pack(out, y);
    out[31] ^= (uint8_t)(fe_parity(x) << 7);
}

// -A for the 32-byte encoding of A (RFC 8032 5.1.3), or 0 if it is not a canonical encoding
// of a curve point: y >= p, no square root, or x = 0 with the sign bit set.
static int pt_decode_neg(point *r, const uint8_t s[32]) {
    int y_below_p = 0;  // y < p = 2^255 - 19, bit 255 aside
    if ((s[31] & 0x7f) != 0x7f || s[0] < 0xed) {
        y_below_p = 1;
    } else {
        for (int i = 1; i < 31; i++) {
            if (s[i] != 0xff) {
                y_below_p = 1;
                break;
            }
        }
    }
    if (!y_below_p) {
        return 0;
    }
    fe one, u, v, v2, v4, v6, t, chk;
    fe_set(one, 1);
    fe_set(r->z, 1);
    fe_unpack(r->y, s);
    fe_sq(u, r->y);
    fe_mul(v, u, fe_d);
    fe_sub(u, u, one);  // u = y^2 - 1
    fe_add(v, v, one);  // v = d y^2 + 1
    fe_sq(v2, v);
    fe_sq(v4, v2);
    fe_mul(v6, v4, v2);
    fe_mul(t, v6, u);
    fe_mul(t, t, v);  // u v^7
    fe_pow2523(t, t);
    fe_mul(t, t, u);
    fe_mul(t, t, v);
    fe_mul(t, t, v);
    fe_mul(r->x, t, v);  // x = u v^3 (u v^7)^((p - 5) / 8)
    fe_sq(chk, r->x);
    fe_mul(chk, chk, v);
    if (!fe_equal(chk, u)) {
        fe_mul(r->x, r->x, fe_sqrtm1);
    }
    fe_sq(chk, r->x);
    fe_mul(chk, chk, v);
    if (!fe_equal(chk, u)) {
        return 0;
    }
    int sign = s[31] >> 7;
    if (sign && fe_is_zero(r->x)) {
        return 0;
    }
    if (fe_parity(r->x) == sign) {  // x has the encoded sign: negate it for -A
        fe zero;
        fe_set(zero, 0);
        fe_sub(r->x, zero, r->x);
    }
    fe_mul(r->t, r->x, r->y);
    return 1;
}

static int bit_at(const uint8_t *s, int i) {
    return (s[i >> 3] >> (i & 7)) & 1;
}

// The fixed base's 4-tooth comb, microfed.ed25519_py's table (_build_comb): entry i - 1 is the
// sum of 2^(64 j) B over the bits j of i, as (y + x, y - x, 2 d x y) in 16-bit limbs.
// tests/test_ed25519.py reads it from this file and compares it with _build_comb().
static const fe comb_table[15][3] = {
    {{0x3b85, 0xf58c, 0x93c6, 0x2fbc, 0x0e19, 0xfb8c, 0x2dc6, 0xcf93, 0x42c2, 0x643d, 0x4898, 0x270b, 0xba65, 0x33d4, 0x9d3a, 0x07cf},
     {0x913e, 0xd740, 0x3905, 0x9d10, 0xbeb3, 0xd140, 0x9f05, 0xfd39, 0x8a09, 0x688f, 0x8434, 0xa5c1, 0x1267, 0x98f8, 0x2f92, 0x44fd},
     {0xaa68, 0x877a, 0x1205, 0xabc9, 0xc49e, 0xccaa, 0xe823, 0x26d9, 0x598c, 0xdd43, 0x7dcb, 0x5a1b, 0x65a8, 0x9f0c, 0x7b68, 0x6f11}},
    {{0xf515, 0x77d1, 0x65e7, 0xcd2a, 0x60f1, 0x8faa, 0x9187, 0x5489, 0x06e5, 0xdabc, 0x3bbc, 0xb1b7, 0xc9fb, 0xa97c, 0x78cb, 0x6548},
     {0xb0fe, 0x8df6, 0x8ec7, 0x5113, 0xf51b, 0xe575, 0xda89, 0x5397, 0xf1b9, 0x717a, 0x7a1d, 0x0920, 0xd650, 0x2b20, 0xfdba, 0x2102},
     {0xe6a1, 0x055c, 0xe405, 0x969e, 0xad29, 0x1251, 0xa768, 0x36bc, 0xa415, 0xaa7d, 0xf517, 0x3a1a, 0xb2ba, 0x29ec, 0x25db, 0x0ad7}},
    {{0x59e8, 0x601e, 0xc585, 0x0055, 0x0e60, 0x6648, 0x342b, 0x8793, 0xe44c, 0xfe45, 0xaad0, 0x3e14, 0xcf2b, 0x4813, 0xd8e6, 0x26ea},
     {0x62a4, 0x9c84, 0xb8b6, 0xcb75, 0x1cd7, 0x67d3, 0x6fc5, 0x2dd8, 0x42f6, 0x8813, 0x72ec, 0xcd19, 0x2f2f, 0x0fc1, 0xb597, 0x0975},
     {0xa743, 0xda5b, 0x2303, 0x63cf, 0xba6e, 0x52f1, 0x9d81, 0x04bf, 0x67da, 0xaa73, 0x90d0, 0x3337, 0xc5ea, 0x9df6, 0x7047, 0x5346}},
    {{0x8ea2, 0xacad, 0x04bf, 0x583b, 0xe884, 0x148b, 0x43e8, 0x29b7, 0xc5db, 0x0810, 0x583b, 0x2b1e, 0xbbaa, 0x8eb3, 0x49e5, 0x2b54},
     {0xbe47, 0xeb3d, 0x7562, 0x5f3a, 0xa0b8, 0x8ebd, 0x3854, 0xf7ea, 0x7299, 0x4574, 0xe531, 0x00c3, 0xd551, 0x1627, 0xe9e7, 0x1304},
     {0x9cfe, 0x6adc, 0x14d2, 0x7898, 0xdd0b, 0x8b48, 0xab3f, 0x3c1b, 0xc60a, 0xf979, 0xe1ff, 0xda0f, 0xd693, 0x7c2d, 0xde2d, 0x4468}},
    {{0x6748, 0xe3bc, 0x278d, 0x2118, 0x0ef7, 0xd0b2, 0xfd60, 0xe71f, 0xb198, 0xc67b, 0xbe51, 0xf551, 0x3d4d, 0xd054, 0x3664, 0x26a1},
     {0x39ee, 0x13a3, 0x2d3b, 0x2952, 0x9529, 0x6cd8, 0x2550, 0x8552, 0xf0f1, 0xacf4, 0x3ad4, 0xdfea, 0x742e, 0x7942, 0x6bba, 0x49d7},
     {0xe61d, 0x8d56, 0x4233, 0x14fa, 0x299a, 0xc351, 0x3946, 0x191d, 0xb185, 0xa7ad, 0x576d, 0x247d, 0xedc2, 0xa8fc, 0xafe3, 0x4e1f}},
    {{0x044c, 0x236a, 0x053d, 0x15e7, 0x87e3, 0x3b8d, 0xbcb1, 0x3cdd, 0xa828, 0xd321, 0x60d2, 0x5199, 0xbba4, 0x0fc5, 0x9a0f, 0x4e55},
     {0x701c, 0x9c12, 0xe876, 0xfe00, 0x3b5f, 0x039c, 0xdc0a, 0x95dc, 0xeb1b, 0x0c02, 0x454b, 0xc169, 0x530c, 0x5f87, 0x21d3, 0x7270},
     {0x241e, 0x27df, 0x0407, 0xa571, 0x0d36, 0xb290, 0xefaa, 0xdf45, 0x9ade, 0x60a6, 0xdb5c, 0xfe6e, 0xc01d, 0x07bb, 0xb730, 0x64fc}},
    {{0x90ca, 0x6fd3, 0x58cc, 0x38ef, 0x98fc, 0x171a, 0x6575, 0xef78, 0xd65f, 0xc442, 0xb78f, 0x8850, 0x86ef, 0x6fd0, 0xc66d, 0x6f34},
     {0xdc04, 0x3898, 0xcbb4, 0x93f3, 0xb727, 0x4307, 0xffb2, 0x0791, 0x981d, 0xce34, 0x8096, 0xd7bd, 0x9f6d, 0x8b84, 0x8b8e, 0x0b59},
     {0xf689, 0x0cc2, 0xc18a, 0x11cf, 0xce2a, 0xb529, 0x4607, 0x8111, 0x5940, 0xc00b, 0xc046, 0x0a9b, 0x66c8, 0xb1ac, 0x28b0, 0x4121}},
    {{0x1ac0, 0xc80c, 0xcc9d, 0xa66d, 0xa436, 0x1b38, 0x5cf4, 0x97a0, 0xd7c6, 0x95db, 0xf3be, 0xa7eb, 0x7dab, 0x8d7e, 0xb8f6, 0x7da0},
     {0x75a6, 0x3856, 0x2014, 0xef78, 0xa9e8, 0xaafd, 0x9f30, 0xa264, 0xa8cb, 0x5cdf, 0xeb50, 0x4cd1, 0xc0b3, 0x1d4d, 0x5aba, 0x4611},
     {0xda76, 0xc3b5, 0x1953, 0xd40f, 0x9e9b, 0x2111, 0x6f73, 0x1dac, 0x5960, 0xfeb2, 0x6021, 0x03cc, 0x4b4b, 0x8367, 0x887e, 0x5a5f}},
    {{0xc1f4, 0x0ca2, 0x6018, 0x0a8d, 0xdf40, 0xcc68, 0xb0db, 0x815e, 0x4e99, 0xb82f, 0x7a47, 0xd7e6, 0x15c0, 0x607f, 0x2890, 0x45a0},
     {0xf184, 0xfd41, 0x66d1, 0xfef3, 0xe11e, 0x01cf, 0x4a11, 0x8b69, 0xa74d, 0x0150, 0xe15e, 0x4b39, 0x51ba, 0x6ad3, 0xf03d, 0x4013},
     {0x65cc, 0x6ee0, 0x82dc, 0xbd02, 0xe646, 0x224a, 0x94fd, 0x36b9, 0xe874, 0xfebc, 0x9ad8, 0x534e, 0x6e4f, 0xd9f0, 0x55c1, 0x4822}},
    {{0xf800, 0x71ce, 0xeacf, 0x3c03, 0xfebb, 0xca8a, 0x7544, 0x9036, 0xc477, 0x6a29, 0xea28, 0x383f, 0x5462, 0xbc65, 0x93b0, 0x4e85},
     {0x638c, 0xa3e5, 0x114a, 0x12de, 0xf20d, 0x29c4, 0x4aa9, 0xba2a, 0x13a3, 0x7b8b, 0xd29d, 0x56b0, 0x7944, 0x7b9b, 0x1a49, 0x6bb9},
     {0xd206, 0xc5e7, 0xe646, 0x2a49, 0xc445, 0x9263, 0xf9cd, 0xb13e, 0x529e, 0xedab, 0x6ce8, 0x50ab, 0xe39b, 0xb0eb, 0x7d79, 0x20cf}},
    {{0x5c48, 0x8ae7, 0x8f4e, 0xcbd2, 0x0b60, 0x4400, 0x0291, 0x3cde, 0x2170, 0x98bc, 0xb9c8, 0x373b, 0x0886, 0x9f57, 0x8853, 0x7c11},
     {0x7dca, 0xf0fe, 0x939d, 0x7db4, 0x51ce, 0xcba9, 0xb90f, 0xf50e, 0x1d1d, 0x357e, 0xe61c, 0x098b, 0x469d, 0x8899, 0x6237, 0x0235},
     {0x4c03, 0xe15a, 0xeffa, 0x20f6, 0x8e05, 0x3c77, 0x0a94, 0x2f47, 0xde67, 0xfc99, 0x0a03, 0x79f5, 0x1483, 0xd106, 0x0188, 0x38d2}},
    {{0x15df, 0x0e63, 0x11ad, 0x23e8, 0xb290, 0xe2ae, 0x0d05, 0x0b65, 0x586c, 0xa75d, 0x0f59, 0xb7ba, 0x4dee, 0x5e1f, 0xedd4, 0x043e},
     {0x3217, 0xc707, 0x47f2, 0xf6c1, 0xd20c, 0xf3af, 0xb919, 0xc651, 0xf802, 0x7041, 0xdbfd, 0x258f, 0x073e, 0x4f45, 0x4fa9, 0x173c},
     {0xf9c4, 0x928d, 0xea60, 0x3d71, 0x562d, 0x3373, 0x7806, 0x5b7e, 0x52b2, 0xa295, 0x514c, 0xd9b0, 0xc472, 0x993c, 0x7024, 0x1e2a}},
    {{0x811f, 0xd45c, 0x0fbc, 0x601a, 0x0803, 0x92ec, 0xbc7d, 0x24b7, 0x407f, 0x17d2, 0xe62b, 0xa0ca, 0x5b26, 0x0622, 0x43ee, 0x5fcb},
     {0xfba4, 0x3509, 0x09b9, 0x3105, 0x1b75, 0x0563, 0xb376, 0x0d8d, 0x1c87, 0x5240, 0xccba, 0x97de, 0xe773, 0x11b2, 0x49f4, 0x0446},
     {0x215f, 0x9598, 0x24ad, 0x0c0d, 0x628c, 0xcc36, 0x9026, 0x1b7f, 0xdcea, 0x7016, 0x2f55, 0x338e, 0xe58f, 0x5cc0, 0x1bfa, 0x0c8a}},
    {{0x104c, 0x681d, 0x03b5, 0x8de7, 0xcb45, 0x1263, 0x7a59, 0x3d2f, 0x6c63, 0x1ce5, 0x0c17, 0xae71, 0xe6ca, 0xfcc3, 0x7c7e, 0x6b85},
     {0x01c0, 0x8b28, 0x56b4, 0x79d2, 0x0fc4, 0x3c40, 0xbeac, 0x7e9f, 0xba41, 0x4733, 0xab1d, 0xa751, 0x8aca, 0xdd41, 0x2bf5, 0x09de},
     {0x687f, 0xeff0, 0x0ff3, 0x3bf1, 0x7ba2, 0xf1e3, 0xea34, 0x5eba, 0x034d, 0x1d66, 0x6126, 0xe49e, 0x42ca, 0xc3b2, 0x6e2a, 0x5b46}},
    {{0xb842, 0x47fb, 0xeb67, 0x137e, 0x1a8b, 0x6081, 0x5c75, 0x79df, 0xc89a, 0x71f8, 0xa76f, 0x5a2b, 0xffc2, 0x3bc8, 0x2a56, 0x0995},
     {0xf83c, 0xdc7e, 0xcb4b, 0xa2a8, 0xc226, 0x5f93, 0xc6fa, 0x96b5, 0xe3a5, 0x0664, 0xeb1b, 0xd4eb, 0xcf2f, 0xe5c6, 0x4adc, 0x409b},
     {0x50c4, 0x8343, 0x3db9, 0x44d5, 0x05b4, 0xa5f5, 0x9305, 0x8929, 0xff2f, 0x5949, 0xfaa2, 0xfb22, 0x7d64, 0x0465, 0x68a7, 0x69b9}},
};

// p += q, q an affine point in the comb's form (7 multiplications).
static void pt_madd(point *p, const fe q[3]) {
    fe a, b, c, d, e, f, g, h;
    fe_sub(a, p->y, p->x);
    fe_mul(a, a, q[1]);
    fe_add(b, p->y, p->x);
    fe_mul(b, b, q[0]);
    fe_mul(c, p->t, q[2]);
    fe_add(d, p->z, p->z);
    fe_sub(e, b, a);
    fe_sub(f, d, c);
    fe_add(g, d, c);
    fe_add(h, b, a);
    fe_mul(p->x, e, f);
    fe_mul(p->y, g, h);
    fe_mul(p->z, g, f);
    fe_mul(p->t, e, h);
}

// p = [n]B for a 32-byte little-endian n: 63 doublings and at most 64 additions (digit i of
// the comb: bit i + 64 j of n is its bit j).
static void pt_base_mul(point *p, const uint8_t n[32]) {
    pt_identity(p);
    for (int i = 63; i >= 0; i--) {
        if (i != 63) {
            pt_dbl(p);
        }
        int digit = bit_at(n, i) | (bit_at(n, i + 64) << 1) | (bit_at(n, i + 128) << 2)
            | (bit_at(n, i + 192) << 3);
        if (digit) {
            pt_madd(p, comb_table[digit - 1]);
        }
    }
}

// p = [s]B + [k]q for 32-byte little-endian scalars: one double-and-add pass over both
// (Straus), from the highest bit set in either; B is added in the comb's affine form (its
// first entry), 7 multiplications instead of 9.
static void pt_joint(point *p, const uint8_t s[32], const uint8_t k[32], const point *q) {
    pt_identity(p);
    int top = 255;
    while (top >= 0 && !bit_at(s, top) && !bit_at(k, top)) {
        top--;
    }
    for (int i = top; i >= 0; i--) {
        if (i != top) {
            pt_dbl(p);
        }
        if (bit_at(s, i)) {
            pt_madd(p, comb_table[0]);
        }
        if (bit_at(k, i)) {
            pt_add(p, q);
        }
    }
}

// --- scalars mod L = 2^252 + 27742317777372353535851937790883648493 --------------------

static const i64 scalar_l[32] = {
    0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde, 0x14,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
};

// r = x mod L, x given as 64 signed byte-sized limbs (TweetNaCl's modL).
static void mod_l(uint8_t r[32], i64 x[64]) {
    for (int i = 63; i >= 32; i--) {
        i64 carry = 0;
        int j;
        for (j = i - 32; j < i - 12; j++) {
            x[j] += carry - 16 * x[i] * scalar_l[j - (i - 32)];
            carry = (x[j] + 128) >> 8;
            x[j] -= carry * 256;
        }
        x[j] += carry;
        x[i] = 0;
    }
    i64 carry = 0;
    for (int j = 0; j < 32; j++) {
        x[j] += carry - (x[31] >> 4) * scalar_l[j];
        carry = x[j] >> 8;
        x[j] &= 255;
    }
    for (int j = 0; j < 32; j++) {
        x[j] -= carry * scalar_l[j];
    }
    for (int i = 0; i < 32; i++) {
        x[i + 1] += x[i] >> 8;
        r[i] = (uint8_t)(x[i] & 255);
    }
}

static void reduce64(uint8_t r[32], const uint8_t h[64]) {
    i64 x[64];
    for (int i = 0; i < 64; i++) {
        x[i] = h[i];
    }
    mod_l(r, x);
}

static int scalar_below_l(const uint8_t s[32]) {
    for (int i = 31; i >= 0; i--) {
        if (s[i] != scalar_l[i]) {
            return s[i] < scalar_l[i];
        }
    }
    return 0;  // equal to L
}

// --- the module ------------------------------------------------------------------------

// bytes or bytearray (what microfed.ed25519_py accepts), of length n (or any, n < 0).
static int get_bytes(mp_obj_t o, mp_int_t n, mp_buffer_info_t *bi) {
    const mp_obj_type_t *t = mp_obj_get_type(o);
    if (t != &mp_type_bytes && t != &mp_type_bytearray) {
        return 0;
    }
    mp_get_buffer_raise(o, bi, MP_BUFFER_READ);
    return n < 0 || (mp_int_t)bi->len == n;
}

static void expand_seed(mp_obj_t seed_in, uint8_t az[64]) {
    mp_buffer_info_t seed;
    if (!get_bytes(seed_in, -1, &seed)) {
        mp_raise_TypeError(MP_ERROR_TEXT("Ed25519 seed must be bytes"));
    }
    if (seed.len != 32) {
        mp_raise_msg_varg(&mp_type_ValueError, MP_ERROR_TEXT("Ed25519 seed must be 32 bytes, got %d"),
            (int)seed.len);
    }
    sha512_ctx s;
    sha512_init(&s);
    sha512_update(&s, seed.buf, 32);
    sha512_final(&s, az);
    az[0] &= 248;
    az[31] &= 63;
    az[31] |= 64;
}

// The public key encode([a]B) of an expanded seed, a its clamped first half: the comb takes
// any 256-bit scalar, so a needs no reduction mod L.
static void public_from(uint8_t pub[32], const uint8_t az[64]) {
    point p;
    pt_base_mul(&p, az);
    pt_encode(pub, &p);
}

static mp_obj_t ed25519_public_key(mp_obj_t seed_in) {
    uint8_t az[64], pub[32];
    expand_seed(seed_in, az);
    public_from(pub, az);
    return mp_obj_new_bytes(pub, 32);
}
static MP_DEFINE_CONST_FUN_OBJ_1(ed25519_public_key_obj, ed25519_public_key);

static mp_obj_t ed25519_sign(size_t n_args, const mp_obj_t *args) {
    mp_buffer_info_t msg, pub;
    if (!get_bytes(args[1], -1, &msg)) {
        mp_raise_TypeError(MP_ERROR_TEXT("message must be bytes"));
    }
    int have_pub = n_args > 2 && args[2] != mp_const_none;
    if (have_pub && !get_bytes(args[2], 32, &pub)) {
        mp_raise_ValueError(MP_ERROR_TEXT("Ed25519 public key must be 32 bytes"));
    }
    uint8_t az[64], h[64], r[32], k[32], sig[64], pk[32];
    expand_seed(args[0], az);
    sha512_ctx s;
    sha512_init(&s);
    sha512_update(&s, az + 32, 32);
    sha512_update(&s, msg.buf, msg.len);
    sha512_final(&s, h);
    reduce64(r, h);
    point p;
    pt_base_mul(&p, r);
    pt_encode(sig, &p);  // R
    if (have_pub) {
        memcpy(pk, pub.buf, 32);
    } else {
        public_from(pk, az);
    }
    sha512_init(&s);
    sha512_update(&s, sig, 32);
    sha512_update(&s, pk, 32);
    sha512_update(&s, msg.buf, msg.len);
    sha512_final(&s, h);
    reduce64(k, h);
    // S = (r + k a) mod L, with a the clamped scalar itself (below 2^255).
    i64 x[64] = {0};
    for (int i = 0; i < 32; i++) {
        x[i] = r[i];
    }
    for (int i = 0; i < 32; i++) {
        for (int j = 0; j < 32; j++) {
            x[i + j] += (i64)k[i] * az[j];
        }
    }
    mod_l(sig + 32, x);
    return mp_obj_new_bytes(sig, 64);
}
static MP_DEFINE_CONST_FUN_OBJ_VAR_BETWEEN(ed25519_sign_obj, 2, 3, ed25519_sign);

static mp_obj_t ed25519_verify(mp_obj_t pub_in, mp_obj_t msg_in, mp_obj_t sig_in) {
    mp_buffer_info_t pub, msg, sig;
    if (!get_bytes(pub_in, 32, &pub) || !get_bytes(msg_in, -1, &msg)
        || !get_bytes(sig_in, 64, &sig)) {
        return mp_const_false;
    }
    const uint8_t *sg = sig.buf;
    if (!scalar_below_l(sg + 32)) {
        return mp_const_false;
    }
    point neg_a, p;
    if (!pt_decode_neg(&neg_a, pub.buf)) {
        return mp_const_false;
    }
    uint8_t h[64], k[32], rr[32];
    sha512_ctx s;
    sha512_init(&s);
    sha512_update(&s, sg, 32);
    sha512_update(&s, pub.buf, 32);
    sha512_update(&s, msg.buf, msg.len);
    sha512_final(&s, h);
    reduce64(k, h);
    pt_joint(&p, sg + 32, k, &neg_a);  // [S]B - [k]A
    pt_encode(rr, &p);
    return mp_obj_new_bool(memcmp(rr, sg, 32) == 0);
}
static MP_DEFINE_CONST_FUN_OBJ_3(ed25519_verify_obj, ed25519_verify);

static const mp_rom_map_elem_t ed25519_module_globals_table[] = {
    { MP_ROM_QSTR(MP_QSTR___name__), MP_ROM_QSTR(MP_QSTR__ed25519) },
    { MP_ROM_QSTR(MP_QSTR_public_key), MP_ROM_PTR(&ed25519_public_key_obj) },
    { MP_ROM_QSTR(MP_QSTR_sign), MP_ROM_PTR(&ed25519_sign_obj) },
    { MP_ROM_QSTR(MP_QSTR_verify), MP_ROM_PTR(&ed25519_verify_obj) },
};
static MP_DEFINE_CONST_DICT(ed25519_module_globals, ed25519_module_globals_table);

const mp_obj_module_t ed25519_user_cmodule = {
    .base = { &mp_type_module },
    .globals = (mp_obj_dict_t *)&ed25519_module_globals,
};

MP_REGISTER_MODULE(MP_QSTR__ed25519, ed25519_user_cmodule);
