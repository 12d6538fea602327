"""Portable SHA-512 (FIPS 180-4) for MicroPython and CPython.

MicroPython ships no SHA-512 on any port, and Ed25519 needs it.  Words are plain Python
ints masked to 64 bits.  microfed's Ed25519 hashes only a few blocks per signature (the
protocol signs a 32-byte SHA-256 digest), so this is tuned for short inputs and a small
heap, not for throughput.

API: ``sha512(data) -> bytes`` (64 bytes) and the incremental ``SHA512`` class
(``update``, ``digest``, ``hexdigest``, ``copy``), like ``hashlib``.
"""

import struct

# Round constants K[0..79] as 640 packed big-endian bytes (tests/test_ed25519.py derives
# them from the cube roots of the first 80 primes).  Not int literals: MicroPython keeps a
# module's constants alive for good, and 80 big ints would hold ~4 KB of heap.
_KB = (
    b"\x42\x8a\x2f\x98\xd7\x28\xae\x22\x71\x37\x44\x91\x23\xef\x65\xcd\xb5\xc0\xfb\xcf\xec\x4d\x3b\x2f\xe9\xb5\xdb\xa5\x81\x89\xdb\xbc"
    b"\x39\x56\xc2\x5b\xf3\x48\xb5\x38\x59\xf1\x11\xf1\xb6\x05\xd0\x19\x92\x3f\x82\xa4\xaf\x19\x4f\x9b\xab\x1c\x5e\xd5\xda\x6d\x81\x18"
    b"\xd8\x07\xaa\x98\xa3\x03\x02\x42\x12\x83\x5b\x01\x45\x70\x6f\xbe\x24\x31\x85\xbe\x4e\xe4\xb2\x8c\x55\x0c\x7d\xc3\xd5\xff\xb4\xe2"
    b"\x72\xbe\x5d\x74\xf2\x7b\x89\x6f\x80\xde\xb1\xfe\x3b\x16\x96\xb1\x9b\xdc\x06\xa7\x25\xc7\x12\x35\xc1\x9b\xf1\x74\xcf\x69\x26\x94"
    b"\xe4\x9b\x69\xc1\x9e\xf1\x4a\xd2\xef\xbe\x47\x86\x38\x4f\x25\xe3\x0f\xc1\x9d\xc6\x8b\x8c\xd5\xb5\x24\x0c\xa1\xcc\x77\xac\x9c\x65"
    b"\x2d\xe9\x2c\x6f\x59\x2b\x02\x75\x4a\x74\x84\xaa\x6e\xa6\xe4\x83\x5c\xb0\xa9\xdc\xbd\x41\xfb\xd4\x76\xf9\x88\xda\x83\x11\x53\xb5"
    b"\x98\x3e\x51\x52\xee\x66\xdf\xab\xa8\x31\xc6\x6d\x2d\xb4\x32\x10\xb0\x03\x27\xc8\x98\xfb\x21\x3f\xbf\x59\x7f\xc7\xbe\xef\x0e\xe4"
    b"\xc6\xe0\x0b\xf3\x3d\xa8\x8f\xc2\xd5\xa7\x91\x47\x93\x0a\xa7\x25\x06\xca\x63\x51\xe0\x03\x82\x6f\x14\x29\x29\x67\x0a\x0e\x6e\x70"
    b"\x27\xb7\x0a\x85\x46\xd2\x2f\xfc\x2e\x1b\x21\x38\x5c\x26\xc9\x26\x4d\x2c\x6d\xfc\x5a\xc4\x2a\xed\x53\x38\x0d\x13\x9d\x95\xb3\xdf"
    b"\x65\x0a\x73\x54\x8b\xaf\x63\xde\x76\x6a\x0a\xbb\x3c\x77\xb2\xa8\x81\xc2\xc9\x2e\x47\xed\xae\xe6\x92\x72\x2c\x85\x14\x82\x35\x3b"
    b"\xa2\xbf\xe8\xa1\x4c\xf1\x03\x64\xa8\x1a\x66\x4b\xbc\x42\x30\x01\xc2\x4b\x8b\x70\xd0\xf8\x97\x91\xc7\x6c\x51\xa3\x06\x54\xbe\x30"
    b"\xd1\x92\xe8\x19\xd6\xef\x52\x18\xd6\x99\x06\x24\x55\x65\xa9\x10\xf4\x0e\x35\x85\x57\x71\x20\x2a\x10\x6a\xa0\x70\x32\xbb\xd1\xb8"
    b"\x19\xa4\xc1\x16\xb8\xd2\xd0\xc8\x1e\x37\x6c\x08\x51\x41\xab\x53\x27\x48\x77\x4c\xdf\x8e\xeb\x99\x34\xb0\xbc\xb5\xe1\x9b\x48\xa8"
    b"\x39\x1c\x0c\xb3\xc5\xc9\x5a\x63\x4e\xd8\xaa\x4a\xe3\x41\x8a\xcb\x5b\x9c\xca\x4f\x77\x63\xe3\x73\x68\x2e\x6f\xf3\xd6\xb2\xb8\xa3"
    b"\x74\x8f\x82\xee\x5d\xef\xb2\xfc\x78\xa5\x63\x6f\x43\x17\x2f\x60\x84\xc8\x78\x14\xa1\xf0\xab\x72\x8c\xc7\x02\x08\x1a\x64\x39\xec"
    b"\x90\xbe\xff\xfa\x23\x63\x1e\x28\xa4\x50\x6c\xeb\xde\x82\xbd\xe9\xbe\xf9\xa3\xf7\xb2\xc6\x79\x15\xc6\x71\x78\xf2\xe3\x72\x53\x2b"
    b"\xca\x27\x3e\xce\xea\x26\x61\x9c\xd1\x86\xb8\xc7\x21\xc0\xc2\x07\xea\xda\x7d\xd6\xcd\xe0\xeb\x1e\xf5\x7d\x4f\x7f\xee\x6e\xd1\x78"
    b"\x06\xf0\x67\xaa\x72\x17\x6f\xba\x0a\x63\x7d\xc5\xa2\xc8\x98\xa6\x11\x3f\x98\x04\xbe\xf9\x0d\xae\x1b\x71\x0b\x35\x13\x1c\x47\x1b"
    b"\x28\xdb\x77\xf5\x23\x04\x7d\x84\x32\xca\xab\x7b\x40\xc7\x24\x93\x3c\x9e\xbe\x0a\x15\xc9\xbe\xbc\x43\x1d\x67\xc4\x9c\x10\x0d\x4c"
    b"\x4c\xc5\xd4\xbe\xcb\x3e\x42\xb6\x59\x7f\x29\x9c\xfc\x65\x7e\x2a\x5f\xcb\x6f\xab\x3a\xd6\xfa\xec\x6c\x44\x19\x8c\x4a\x47\x58\x17"
)
_H0 = (
    0x6a09e667f3bcc908, 0xbb67ae8584caa73b, 0x3c6ef372fe94f82b, 0xa54ff53a5f1d36f1,
    0x510e527fade682d1, 0x9b05688c2b3e6c1f, 0x1f83d9abfb41bd6b, 0x5be0cd19137e2179,
)
_M = 0xFFFFFFFFFFFFFFFF


def _compress(H, block, M=_M, unpack_from=struct.unpack_from):
    # Every allocation here is small (<= 16 words): on a fragmented MicroPython heap a
    # single 80-entry tuple can fail where many small objects still fit.
    # 16-word rolling message schedule: W[t & 15] holds W[t].
    W = list(struct.unpack(">16Q", block))
    a, b, c, d, e, f, g, h = H
    bc = b ^ c
    for t in range(80):
        if t < 16:
            w = W[t]
        else:
            # Rotations use the doubled word xx = x | x << 64: (xx >> n) holds rotr(x, n)
            # in its low 64 bits.  The sigma/Sigma sums are not masked: their garbage lies
            # above bit 63 and only reaches additions whose result is masked, so the low 64
            # bits stay exact and each saves a big-int operation.
            x = W[(t - 15) & 15]
            xx = x | (x << 64)
            y = W[(t - 2) & 15]
            yy = y | (y << 64)
            w = (W[t & 15] + W[(t - 7) & 15] + ((xx >> 1) ^ (xx >> 8) ^ (x >> 7))
                 + ((yy >> 19) ^ (yy >> 61) ^ (y >> 6))) & M
            W[t & 15] = w
        if not t & 15:
            K = unpack_from(">16Q", _KB, t << 3)
        ee = e | (e << 64)
        t1 = h + ((ee >> 14) ^ (ee >> 18) ^ (ee >> 41)) + (g ^ (e & (f ^ g))) + K[t & 15] + w
        aa = a | (a << 64)
        ab = a ^ b
        # Maj(a, b, c) = b ^ ((a ^ b) & (b ^ c)); this round's a ^ b is the next one's b ^ c.
        t2 = ((aa >> 28) ^ (aa >> 34) ^ (aa >> 39)) + (b ^ (ab & bc))
        bc = ab
        h = g
        g = f
        f = e
        e = (d + t1) & M
        d = c
        c = b
        b = a
        a = (t1 + t2) & M
    return ((H[0] + a) & M, (H[1] + b) & M, (H[2] + c) & M, (H[3] + d) & M,
            (H[4] + e) & M, (H[5] + f) & M, (H[6] + g) & M, (H[7] + h) & M)


class SHA512:
    """Incremental SHA-512: ``SHA512(b"ab").update(b"c").digest()``."""

    digest_size = 64
    block_size = 128

    def __init__(self, data=b""):
        self._h = _H0
        self._buf = b""
        self._n = 0
        if data:
            self.update(data)

    def update(self, data):
        """Add bytes-like ``data``; returns self."""
        data = bytes(data)
        self._n += len(data)
        buf = self._buf + data if self._buf else data
        i = 0
        n = len(buf)
        h = self._h
        mv = memoryview(buf)
        while n - i >= 128:
            h = _compress(h, mv[i:i + 128])  # a view: no 128-byte copy per block
            i += 128
        self._h = h
        self._buf = buf[i:]
        return self

    def digest(self):
        """The 64-byte digest of everything added so far (the object stays usable)."""
        # Padding: 0x80, zeros, then the bit length as a 128-bit big-endian integer, written
        # into one buffer of the final length (one or two blocks) and compressed through
        # views: concatenating the tail made a copy per step, up to 129-byte blocks that a
        # 48 KB gossip node's split heap did not have while signing (docs/results.md).
        bits = self._n * 8
        buf = self._buf
        n = len(buf)
        tail = bytearray(128 if n < 112 else 256)
        tail[:n] = buf
        tail[n] = 0x80
        struct.pack_into(">QQ", tail, len(tail) - 16, (bits >> 64) & _M, bits & _M)
        h = self._h
        mv = memoryview(tail)
        for i in range(0, len(tail), 128):
            h = _compress(h, mv[i:i + 128])
        return struct.pack(">8Q", h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7])

    def hexdigest(self):
        return "".join("%02x" % b for b in self.digest())

    def copy(self):
        c = SHA512()
        c._h = self._h
        c._buf = self._buf
        c._n = self._n
        return c


def sha512(data):
    """SHA-512 digest (64 bytes) of bytes-like ``data``."""
    return SHA512(data).digest()
