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
    // Horner's scheme written as statements (a nested expression takes rustfmt minutes):
    // `p = 1/11!`, then `p = 1/i! + r * p` for i = 10 down to 0.
    let mut poly = 1.0 / 39_916_800.0;
    poly = 1.0 / 3_628_800.0 + r * poly;
    poly = 1.0 / 362_880.0 + r * poly;
    poly = 1.0 / 40_320.0 + r * poly;
    poly = 1.0 / 5040.0 + r * poly;
    poly = 1.0 / 720.0 + r * poly;
    poly = 1.0 / 120.0 + r * poly;
    poly = 1.0 / 24.0 + r * poly;
    poly = 1.0 / 6.0 + r * poly;
    poly = 1.0 / 2.0 + r * poly;
    poly = 1.0 + r * poly;
    poly = 1.0 + r * poly;
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

    /// The function as first written, with the polynomial as one nested expression; kept to prove
    /// that the statement form gives bit-identical results. (rustfmt would spend minutes on it.)
    #[rustfmt::skip]
    fn nested_form(x: f64) -> f64 {
        let clamped = if x < SMALLEST_ARGUMENT { SMALLEST_ARGUMENT } else { x };
        let shifted = clamped * LOG2_E + ROUNDER;
        let k = shifted - ROUNDER;
        let r = clamped - k * LN2_HI - k * LN2_LO;
        let poly = 1.0 + r * (1.0 + r * (1.0 / 2.0 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0 + r * (1.0 / 40_320.0 + r * (1.0 / 362_880.0 + r * (1.0 / 3_628_800.0 + r * (1.0 / 39_916_800.0)))))))))));
        let k_int = shifted.to_bits() as i64 - ROUNDER.to_bits() as i64;
        let scale = f64::from_bits(((k_int + 1023) as u64) << 52);
        if x < SMALLEST_ARGUMENT { 0.0 } else { poly * scale }
    }

    fn assert_same_bits(x: f64) {
        let (got, want) = (exp_non_positive(x), nested_form(x));
        assert_eq!(
            got.to_bits(),
            want.to_bits(),
            "x = {x:e}: {got:e} vs {want:e}"
        );
    }

    /// Bit-identical to the nested form on: a uniform grid over the whole domain, random bit
    /// patterns of non-positive doubles, the neighbourhoods (a few ulps) of every point where the
    /// exponent `k` changes, the f32 differences the kernel actually sees, and the edges.
    #[test]
    fn statement_form_is_bit_identical_to_the_nested_form() {
        let steps = 4_000_000u32;
        for i in 0..=steps {
            assert_same_bits(-709.0 * f64::from(i) / f64::from(steps));
        }
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..4_000_000 {
            // xorshift64*: any non-positive double, from -0.0 and subnormals to -inf.
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let bits = state.wrapping_mul(0x2545_f491_4f6c_dd1d) | (1 << 63);
            let x = f64::from_bits(bits);
            if !x.is_nan() {
                assert_same_bits(x);
            }
        }
        for k in 0..=1022 {
            let boundary = -(f64::from(k) + 0.5) * std::f64::consts::LN_2;
            let mut x = boundary;
            for _ in 0..64 {
                x = f64::from_bits(x.to_bits() - 1); // towards zero
            }
            for _ in 0..128 {
                assert_same_bits(x);
                x = f64::from_bits(x.to_bits() + 1); // away from zero
            }
        }
        for a in 0..2000 {
            for b in 0..200 {
                let (high, low) = (
                    -(a as f32) * 0.0371,
                    -(b as f32) * 1.73 - (a as f32) * 0.0113,
                );
                assert_same_bits(f64::from(low) - f64::from(high.max(low)));
            }
        }
        for x in [
            0.0,
            -0.0,
            -f64::MIN_POSITIVE,
            -5e-324,
            -708.0,
            -708.000_000_1,
            -745.0,
            -1e308,
        ] {
            assert_same_bits(x);
        }
        assert_same_bits(f64::NEG_INFINITY);
    }

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
