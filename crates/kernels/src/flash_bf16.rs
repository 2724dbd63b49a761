//! The tile products of [`crate::flash`] in bf16 on AVX512-BF16, with each operand rounded and
//! packed once: K and V (and their transposes) per (batch, kv-group) task, Q and dO per query
//! tile; only the probabilities and their gradients, made tile by tile, are packed per
//! product. Through the general bf16 matmul every 64 x 64 product packed both operands again,
//! and at head widths of 32-64 that packing cost as much as the products.
//!
//! Every output is the sum [`crate::bf16`] defines (one f32 accumulator, pairs in order, in a
//! single block of at most `KCP` pairs), so the results are the bits of
//! [`crate::flash::Generic`] in bf16 (tested).

use crate::bf16::fast::{a_by_rows, pack_a, pack_b, tile};
use crate::bf16::{KCP, MR, NR};
use crate::flash::{transposed, Tiles};
use crate::matmul::View;

/// A B operand (K, N) rounded and packed whole: NR-column panels of `[K block][pair][column]`,
/// blocks of `bk` pairs (KCP, or all of K's pairs when fewer).
#[derive(Default)]
struct PackedB {
    buf: Vec<u32>,
    kblocks: usize,
    bk: usize,
}

impl PackedB {
    fn pack(&mut self, b: &View, k: usize, n: usize) {
        let kp = k.div_ceil(2);
        self.bk = KCP.min(kp).max(1);
        self.kblocks = kp.div_ceil(self.bk).max(1);
        let npan = n.div_ceil(NR);
        let block = self.bk * NR;
        if self.buf.len() < npan * self.kblocks * block {
            self.buf.resize(npan * self.kblocks * block, 0);
        }
        for pj in 0..npan {
            for kb in 0..self.kblocks {
                let pc = kb * self.bk;
                let kcp = self.bk.min(kp - pc);
                let dst = &mut self.buf[(pj * self.kblocks + kb) * block..][..block];
                // SAFETY: a Packed engine exists only on AVX512-BF16 hardware; `b` covers
                // (k, n) (the caller's views).
                unsafe { pack_b(dst, b, pc, kcp, pj * NR, NR.min(n - pj * NR), k) };
            }
        }
    }

    /// Panel `pj` from pair `p0` on; the `pairs` read from there must stay in p0's block.
    fn at(&self, pj: usize, p0: usize, pairs: usize) -> &[u32] {
        let (kb, off) = (p0 / self.bk, p0 % self.bk);
        assert!(off + pairs <= self.bk, "a product crosses a packed K block");
        &self.buf[((pj * self.kblocks + kb) * self.bk + off) * NR..]
    }
}

/// An A operand (M, K <= 2 KCP) rounded and packed: MR-row panels.
#[derive(Default)]
struct PackedA {
    buf: Vec<u32>,
    kcp: usize,
    by_rows: bool,
}

impl PackedA {
    fn pack(&mut self, a: &View, m: usize, k: usize) {
        self.kcp = k.div_ceil(2);
        assert!(self.kcp <= KCP, "tile products need K <= {}", 2 * KCP);
        self.by_rows = a_by_rows(a);
        let npan = m.div_ceil(MR);
        if self.buf.len() < npan * MR * KCP {
            self.buf.resize(npan * MR * KCP, 0);
        }
        for (pi, dst) in self.buf.chunks_mut(MR * KCP).take(npan).enumerate() {
            let rows = MR.min(m - pi * MR);
            // SAFETY: as in PackedB::pack.
            unsafe { pack_a(dst, a, 0, self.kcp, pi * MR, rows, k, self.by_rows) };
        }
    }
}

/// `out (m, n) [+]= A @ B[panels pj0.., pairs p0..]`.
///
/// # Safety
/// `out` is valid for the (m, n) tile at row stride `ldc` and owned by the caller; A was
/// packed for m rows; B's panels and pairs cover (A's K, n).
#[allow(clippy::too_many_arguments)]
unsafe fn product(
    out: *mut f32,
    ldc: usize,
    a: &PackedA,
    m: usize,
    b: &PackedB,
    pj0: usize,
    p0: usize,
    n: usize,
    load_c: bool,
) {
    for pi in 0..m.div_ceil(MR) {
        let rows = MR.min(m - pi * MR);
        let ap = &a.buf[pi * MR * KCP..];
        for pj in 0..n.div_ceil(NR) {
            let cols = NR.min(n - pj * NR);
            // SAFETY: the caller's guarantees; the hardware is present (see PackedB::pack).
            unsafe {
                let c = out.add(pi * MR * ldc + pj * NR);
                tile(
                    ap,
                    b.at(pj0 + pj, p0, a.kcp),
                    a.kcp,
                    c,
                    ldc,
                    rows,
                    cols,
                    load_c,
                    a.by_rows,
                );
            }
        }
    }
}

/// One B operand of a task, packed the first time a product needs it.
#[derive(Default)]
struct Lazy<'a> {
    view: Option<View<'a>>,
    k: usize,
    n: usize,
    fresh: bool,
    packed: PackedB,
}

impl<'a> Lazy<'a> {
    fn set(&mut self, view: View<'a>, k: usize, n: usize) {
        (self.view, self.k, self.n, self.fresh) = (Some(view), k, n, false);
    }

    fn get(&mut self) -> &PackedB {
        if !self.fresh {
            self.packed
                .pack(&self.view.expect("task set"), self.k, self.n);
            self.fresh = true;
        }
        &self.packed
    }
}

/// [`Tiles`] over packed bf16 operands (constructed only where [`crate::bf16::has_hardware`]).
#[derive(Default)]
pub(crate) struct Packed<'a> {
    kt: Lazy<'a>, // K^T (D, T): scores
    vt: Lazy<'a>, // V^T (D, T): dP
    k: Lazy<'a>,  // K (T, D): dQ
    v: Lazy<'a>,  // V (T, D): P V
    q: PackedA,
    dout: PackedA,
    qb: PackedB, // Q of the tile as B (nr, D): dK
    dob: PackedB,
    tmp: PackedA,
    nr: usize,
    d: usize,
}

impl<'a> Tiles<'a> for Packed<'a> {
    fn task(&mut self, k: View<'a>, v: View<'a>, t: usize, d: usize) {
        self.d = d;
        self.kt.set(transposed(k), d, t);
        self.vt.set(transposed(v), d, t);
        self.k.set(k, t, d);
        self.v.set(v, t, d);
    }

    fn query(&mut self, q: View<'a>, dout: Option<View<'a>>, nr: usize) {
        self.nr = nr;
        self.q.pack(&q, nr, self.d);
        if let Some(dv) = dout {
            self.dout.pack(&dv, nr, self.d);
            self.qb.pack(&q, nr, self.d);
            self.dob.pack(&dv, nr, self.d);
        }
    }

    unsafe fn scores(&mut self, out: *mut f32, ldc: usize, c0: usize, c1: usize, dp: bool) {
        assert!(c0.is_multiple_of(NR), "key tiles start on a panel");
        let (a, b) = if dp {
            (&self.dout, self.vt.get())
        } else {
            (&self.q, self.kt.get())
        };
        // SAFETY: the caller vouches for `out`; K^T / V^T hold all T columns.
        unsafe { product(out, ldc, a, self.nr, b, c0 / NR, 0, c1 - c0, false) }
    }

    unsafe fn times_kv(
        &mut self,
        out: *mut f32,
        ldc: usize,
        a: View,
        c0: usize,
        c1: usize,
        keys: bool,
    ) {
        assert!(c0.is_multiple_of(2), "key tiles start on a pair");
        self.tmp.pack(&a, self.nr, c1 - c0);
        let b = if keys { self.k.get() } else { self.v.get() };
        // SAFETY: as above; pairs c0/2.. of K / V lie in one block (`at` asserts it).
        unsafe { product(out, ldc, &self.tmp, self.nr, b, 0, c0 / 2, self.d, true) }
    }

    unsafe fn times_q(&mut self, out: *mut f32, ldc: usize, a: View, nc: usize, dout: bool) {
        self.tmp.pack(&a, nc, self.nr);
        let b = if dout { &self.dob } else { &self.qb };
        // SAFETY: as above; Q and dO of the tile were packed by `query`.
        unsafe { product(out, ldc, &self.tmp, nc, b, 0, 0, self.d, true) }
    }
}
