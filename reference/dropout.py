"""moelab's residual dropout masks, bit for bit, in NumPy (for the golden fixtures).

moelab draws a mask with `kernels::dropout::dropout_mask(mask, p, seed, stream)`: a
`rand_chacha` 0.3 `ChaCha8Rng::seed_from_u64(seed)` with `set_stream(stream)`; element i of the
mask is word i of that keystream (the kernel's 4096-element chunks start at word c * 4096, so
chunking does not change the words), kept (value 1/(1-p) in f32) when the u32 word is below
`floor((1 - p) * 2^32)`. The model keys the masks of block l with seed = `Model::dropout_key`
(the trainer's global micro-batch index) and stream 2l (attention branch) or 2l + 1 (FFN).

This file reproduces that generator: rand_core 0.6's PCG32 seed expansion, then the ChaCha
block function with 8 rounds, a 64-bit block counter in words 12-13 and the stream in words
14-15 (rand_chacha's layout). Not here: anything else from `rand`.
"""
import numpy as np

M32 = 0xFFFFFFFF


def seed_from_u64(state):
    """rand_core 0.6 `SeedableRng::seed_from_u64` for a 32-byte seed: 8 PCG32 outputs."""
    words = []
    for _ in range(8):
        state = (state * 6364136223846793005 + 11634580027462260723) & 0xFFFFFFFFFFFFFFFF
        xorshifted = (((state >> 18) ^ state) >> 27) & M32
        rot = state >> 59
        words.append(((xorshifted >> rot) | (xorshifted << ((32 - rot) & 31))) & M32)
    return words


def _rotl(v, r):
    return (v << np.uint32(r)) | (v >> np.uint32(32 - r))


def _quarter(x, a, b, c, d):
    x[a] += x[b]
    x[d] = _rotl(x[d] ^ x[a], 16)
    x[c] += x[d]
    x[b] = _rotl(x[b] ^ x[c], 12)
    x[a] += x[b]
    x[d] = _rotl(x[d] ^ x[a], 8)
    x[c] += x[d]
    x[b] = _rotl(x[b] ^ x[c], 7)


def chacha8_words(seed, stream, n):
    """The first `n` u32 words of ChaCha8Rng::seed_from_u64(seed) on stream `stream`."""
    return keystream(seed_from_u64(seed), stream, n, double_rounds=4)


def keystream(key, stream, n, double_rounds):
    """The first `n` words of the ChaCha keystream for 8 key words (ChaCha20: 10 double rounds,
    checked against rand_chacha's test vectors by `python reference/dropout.py`)."""
    blocks = (n + 15) // 16
    ctr = np.arange(blocks, dtype=np.uint64)
    s = np.zeros((16, blocks), dtype=np.uint32)
    s[0:4] = np.array([0x61707865, 0x3320646E, 0x79622D32, 0x6B206574], dtype=np.uint32)[:, None]
    s[4:12] = np.array(key, dtype=np.uint32)[:, None]
    s[12] = (ctr & np.uint64(M32)).astype(np.uint32)
    s[13] = (ctr >> np.uint64(32)).astype(np.uint32)
    s[14] = stream & M32
    s[15] = (stream >> 32) & M32
    x = s.copy()
    for _ in range(double_rounds):
        _quarter(x, 0, 4, 8, 12)
        _quarter(x, 1, 5, 9, 13)
        _quarter(x, 2, 6, 10, 14)
        _quarter(x, 3, 7, 11, 15)
        _quarter(x, 0, 5, 10, 15)
        _quarter(x, 1, 6, 11, 12)
        _quarter(x, 2, 7, 8, 13)
        _quarter(x, 3, 4, 9, 14)
    return (x + s).T.reshape(-1)[:n]


def dropout_mask(n, p, seed, stream):
    """moelab's `dropout_mask` of `n` elements as float32: 0 (dropped) or 1/(1-p) (kept)."""
    p32 = np.float32(p)
    keep = np.float32(1.0) / (np.float32(1.0) - p32)
    threshold = int((1.0 - float(p32)) * 4294967296.0)
    words = chacha8_words(seed, stream, n).astype(np.uint64)
    return np.where(words < threshold, keep, np.float32(0.0)).astype(np.float32)


if __name__ == "__main__":
    # rand_chacha 0.3's ChaCha20 vectors (test_chacha_true_values_a, test_chacha_nonce)
    got = keystream([0] * 8, 0, 32, double_rounds=10)
    assert got[0] == 0xADE0B876 and got[15] == 0x8665EEB2 and got[16] == 0xBEE7079F, got[:17]
    got = keystream([0] * 8, 2 << (24 + 32), 16, double_rounds=10)
    assert got[0] == 0x374DC6C2 and got[15] == 0x6DED1B53, got
    print("ChaCha keystream matches rand_chacha's test vectors")
