//! Sixteen-lane f32 vectors in portable Rust, and kernels compiled for the widest vector unit of
//! the CPU that runs them.
//!
//! The release build targets baseline x86-64 (SSE2), which would leave three quarters of an
//! AVX-512 or half of an AVX2 unit idle. [`multiversion!`] compiles a kernel's body a second and
//! a third time with AVX-512 and AVX2+FMA enabled and picks one at run time. Vector code is
//! written on [`F32x16`], whose operations are loops over plain arrays that LLVM turns into one
//! AVX-512 instruction (two AVX2 or four SSE ones). Multiply-adds are fused (`mul_add`) on every
//! path, so all paths give the same bits.

use std::ops::{Add, Mul, Sub};

/// Lanes of [`F32x16`].
pub const LANES: usize = 16;

/// Sixteen f32 lanes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct F32x16(pub [f32; LANES]);

impl F32x16 {
    #[inline(always)]
    pub fn splat(v: f32) -> Self {
        F32x16([v; LANES])
    }

    /// The first 16 values of `s`.
    #[inline(always)]
    pub fn load(s: &[f32]) -> Self {
        F32x16(s[..LANES].try_into().unwrap())
    }

    #[inline(always)]
    pub fn store(self, s: &mut [f32]) {
        s[..LANES].copy_from_slice(&self.0);
    }

    #[inline(always)]
    fn map(self, f: impl Fn(f32) -> f32) -> Self {
        let mut r = self.0;
        for v in r.iter_mut() {
            *v = f(*v);
        }
        F32x16(r)
    }

    /// Lane-wise `f(self, o)`.
    #[inline(always)]
    pub fn zip(self, o: Self, f: impl Fn(f32, f32) -> f32) -> Self {
        let mut r = self.0;
        for (v, w) in r.iter_mut().zip(o.0) {
            *v = f(*v, w);
        }
        F32x16(r)
    }

    /// `self * a + b`, fused.
    #[inline(always)]
    pub fn mul_add(self, a: Self, b: Self) -> Self {
        let mut r = self.0;
        for ((x, y), z) in r.iter_mut().zip(a.0).zip(b.0) {
            *x = x.mul_add(y, z);
        }
        F32x16(r)
    }

    #[inline(always)]
    pub fn max(self, o: Self) -> Self {
        self.zip(o, |a, b| if a > b { a } else { b })
    }

    /// Sum of the lanes, in lane order.
    #[inline(always)]
    pub fn reduce_sum(self) -> f32 {
        let mut s = 0.0;
        for v in self.0 {
            s += v;
        }
        s
    }

    /// Lane-wise `e^x`; see [`exp`].
    #[inline(always)]
    pub fn exp(self) -> Self {
        self.map(exp)
    }
}

impl Add for F32x16 {
    type Output = Self;
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        self.zip(o, |a, b| a + b)
    }
}

impl Sub for F32x16 {
    type Output = Self;
    #[inline(always)]
    fn sub(self, o: Self) -> Self {
        self.zip(o, |a, b| a - b)
    }
}

impl Mul for F32x16 {
    type Output = Self;
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        self.zip(o, |a, b| a * b)
    }
}

/// `e^x` in f32 without a libm call, so that loops over it vectorize: Cody-Waite reduction
/// `x = n ln2 + r`, a degree-6 polynomial for `e^r` (Cephes' `expf`, about 1 ulp), then `2^n`
/// through the exponent bits. `n` is rounded by adding 1.5 * 2^23, which leaves it in the low
/// mantissa bits: no float-to-int conversion, which would keep the loop scalar. Below -87
/// (where `e^x` leaves the normal range) it returns 0, so `exp(-inf) = 0` as softmax needs; NaN
/// stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    let t = xc.mul_add(LOG2E, ROUND);
    let n = t - ROUND;
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, xc));
    let mut p = 1.987_569_1e-4f32;
    for c in [1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
        p = p.mul_add(r, c);
    }
    let er = (p * r).mul_add(r, r) + 1.0;
    let y = er * f32::from_bits(t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23);
    let y = if x < -87.0 { 0.0 } else { y };
    if x > 88.0 {
        f32::INFINITY
    } else {
        y
    }
}

multiversion! {
    /// Whether any value is infinite or NaN: a branch-free scan, which vectorizes (a search that
    /// stops at the first hit does not).
    pub fn any_non_finite(v: &[f32]) -> bool {
        let mut bad = 0u32;
        for x in v {
            bad |= (x.to_bits() & 0x7F80_0000 == 0x7F80_0000) as u32;
        }
        bad != 0
    }
}

/// The vector units [`multiversion!`] compiles for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Avx512,
    Avx2,
    Portable,
}

/// The widest vector unit of this CPU.
#[inline]
pub fn level() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl") {
            return Level::Avx512;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Level::Avx2;
        }
    }
    Level::Portable
}

/// Defines a function whose body is compiled for AVX-512, for AVX2+FMA and portably, and that
/// runs the first one the CPU supports. The signature must be concrete (no generics) and every
/// helper the body calls `#[inline(always)]`, so that it is compiled with the same features.
macro_rules! multiversion {
    ($(#[$attr:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$attr])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn portable($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn avx512($($arg: $ty),*) $(-> $ret)? { portable($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn avx2($($arg: $ty),*) $(-> $ret)? { portable($($arg),*) }
                match $crate::simd::level() {
                    // SAFETY: level() saw these features on this CPU.
                    $crate::simd::Level::Avx512 => return unsafe { avx512($($arg),*) },
                    $crate::simd::Level::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::simd::Level::Portable => {}
                }
            }
            portable($($arg),*)
        }
    };
}
pub(crate) use multiversion;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let rel = ((exp(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NAN).is_nan());
    }

    multiversion! {
        fn dot(a: &[f32], b: &[f32]) -> f32 {
            let mut acc = F32x16::splat(0.0);
            for (x, y) in a.chunks_exact(LANES).zip(b.chunks_exact(LANES)) {
                acc = F32x16::load(x).mul_add(F32x16::load(y), acc);
            }
            acc.reduce_sum()
        }
    }

    #[test]
    fn multiversioned_kernels_run() {
        let a: Vec<f32> = (0..64).map(|i| i as f32).collect();
        assert_eq!(dot(&a, &a), (0..64).map(|i| (i * i) as f32).sum::<f32>());
    }
}
