//! `exp` for the non-positive `f64`s of the renormalization, the kernel's main arithmetic cost (one per teacher
//! entry: ~1.3 M per recipe-sized batch).
//!
//! `exp(x) = 2^k * exp(r)` with `k = round(x / ln 2)` and `|r| <= ln 2 / 2`; `exp(r)` is a
//! degree-11 Taylor polynomial (relative error < 1e-14, far below the float32 output's 6e-8). The
//! function has no branches or table lookups, so a loop over it vectorizes: 4 lanes at a time when
//! compiled for AVX2. Every compilation does the same IEEE operations in the same order (Rust never
//! fuses multiply-adds on its own), so the result does not depend on which compilation runs.
//! (The kernel compiles its whole row loop twice, portable and AVX2, and picks one at run time.)

const LOG2_E: f64 = std::f64::consts::LOG2_E;
/// `ln 2` split so that `k * LN2_HI` is exact for the `k` that occur here.
const LN2_HI: f64 = 0.693_147_180_369_123_8;
const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
/// Adding then subtracting `1.5 * 2^52` rounds to the nearest integer; the integer also sits in
/// the low mantissa bits of the sum.
const ROUNDER: f64 = 6_755_399_441_055_744.0;
/// Below this `exp(x)` is under `f64::MIN_POSITIVE`; the result is flushed to exactly 0.
const SMALLEST_ARGUMENT: f64 = -708.0;

/// `exp(x)` for `x <= 0` (not NaN); arguments below -708 give exactly 0.
#[inline(always)]
pub fn exp_non_positive(x: f64) -> f64 {
    let clamped = if x < SMALLEST_ARGUMENT {
        SMALLEST_ARGUMENT
    } else {
        x
    };
    let shifted = clamped * LOG2_E + ROUNDER;
    let k = shifted - ROUNDER;
    let r = clamped - k * LN2_HI - k * LN2_LO;
    let poly = 1.0
        + r * (1.0
            + r * (1.0 / 2.0
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0
                            + r * (1.0 / 720.0
                                + r * (1.0 / 5040.0
                                    + r * (1.0 / 40_320.0
                                        + r * (1.0 / 362_880.0
                                            + r * (1.0 / 3_628_800.0
                                                + r * (1.0 / 39_916_800.0)))))))))));
    // k is in [-1022, 0], so k + 1023 is a valid (normal) biased exponent.
    let k_int = shifted.to_bits() as i64 - ROUNDER.to_bits() as i64;
    let scale = f64::from_bits(((k_int + 1023) as u64) << 52);
    if x < SMALLEST_ARGUMENT {
        0.0
    } else {
        poly * scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_std_exp_to_1e_14_relative() {
        let mut worst = 0.0f64;
        let mut x = 0.0f64;
        while x > -700.0 {
            let want = x.exp();
            let got = exp_non_positive(x);
            worst = worst.max(((got - want) / want).abs());
            x -= 0.012_345_6;
        }
        assert!(worst < 1e-14, "worst relative error {worst:e}");
    }

    #[test]
    fn edges() {
        assert_eq!(exp_non_positive(0.0), 1.0);
        assert_eq!(exp_non_positive(-0.0), 1.0);
        assert_eq!(exp_non_positive(-708.5), 0.0);
        assert_eq!(exp_non_positive(f64::NEG_INFINITY), 0.0);
        assert_eq!(exp_non_positive(-1e308), 0.0);
        assert!(exp_non_positive(-707.9) > 0.0);
    }
}
