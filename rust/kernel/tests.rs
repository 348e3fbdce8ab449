//! Unit tests of the kernel: hand-computed values, the contract's worked example, equivalences
//! between input forms, output forms, thread counts and compilations, and error messages.

use super::datum::fill_rows_body;
use super::row::RowBuffer;
use super::sink::DenseSink;
use super::*;
use ndarray::{arr1, Array2};

const LN_07: f64 = -0.356_674_943_938_732_4; // ln 0.7
const LN_02: f64 = -1.609_437_912_434_100_3; // ln 0.2
const LN_01: f64 = -2.302_585_092_994_045_5; // ln 0.1

fn config(topk: i64, vocab: Option<i64>, skip: i64) -> Config {
    Config::new(topk, vocab, skip, 1.0).expect("valid config")
}

fn dense(input: &DatumInput<'_>, cfg: &Config) -> Result<(Vec<i64>, Vec<f32>, Stats), KernelError> {
    let cells = input.mask.len() * cfg.topk;
    let (mut tokens, mut weights) = (vec![0i64; cells], vec![0f32; cells]);
    let stats = build_dense_datum(0, input, cfg, &mut tokens, &mut weights)?;
    Ok((tokens, weights, stats))
}

fn densify(csr: &CsrTargets) -> (Vec<i64>, Vec<f32>) {
    let mut tokens = vec![0i64; csr.rows * csr.topk];
    let mut weights = vec![0f32; csr.rows * csr.topk];
    for row in 0..csr.rows {
        for cell in csr.crow[row] as usize..csr.crow[row + 1] as usize {
            let at = row * csr.topk + csr.col[cell] as usize;
            tokens[at] = csr.target_tokens[cell];
            weights[at] = csr.weights[cell];
        }
    }
    (tokens, weights)
}

fn dense_input<'a>(
    mask: &'a ndarray::Array1<f32>,
    completion_len: usize,
    teacher_prompt_len: usize,
    teacher: Teacher<'a>,
) -> DatumInput<'a> {
    DatumInput {
        mask: mask.view(),
        completion_len,
        teacher_prompt_len,
        teacher,
    }
}

/// The tinker_contract.md §7 worked example: P = [11..14], C = [21..25], Q has 6 tokens; the
/// fake teacher puts 0.7 on the true token of row i and 0.2 / 0.1 on decoys 1000+i / 2000+i.
fn worked_example_teacher() -> (Array2<i32>, Array2<f32>) {
    let sequence = [91, 92, 93, 94, 95, 96, 21, 22, 23, 24, 25];
    let mut ids = Array2::<i32>::zeros((11, 3));
    let mut lps = Array2::<f32>::from_elem((11, 3), SENTINEL_LOGPROB as f32);
    for i in 1..11 {
        ids[[i, 0]] = sequence[i];
        ids[[i, 1]] = 1000 + i as i32;
        ids[[i, 2]] = 2000 + i as i32;
        lps[[i, 0]] = LN_07 as f32;
        lps[[i, 1]] = LN_02 as f32;
        lps[[i, 2]] = LN_01 as f32;
    }
    (ids, lps)
}

#[test]
fn worked_example_alignment() {
    let (ids, lps) = worked_example_teacher();
    let mask = arr1(&[0.0f32, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]);
    let teacher = Teacher::DenseI32F32(DenseRows::new(0, ids.view(), lps.view()).unwrap());
    let input = dense_input(&mask, 5, 6, teacher);
    let (tokens, weights, stats) = dense(&input, &config(3, None, 0)).unwrap();
    for row in 0..3 {
        assert_eq!(&tokens[row * 3..row * 3 + 3], &[0, 0, 0]);
        assert_eq!(&weights[row * 3..row * 3 + 3], &[0.0, 0.0, 0.0]);
    }
    // Student position 3 + t <-> teacher row 6 + t <-> completion token 21 + t.
    for t in 0..5 {
        let row = 3 + t;
        let teacher_row = 6 + t as i64;
        assert_eq!(
            &tokens[row * 3..row * 3 + 3],
            &[21 + t as i64, 1000 + teacher_row, 2000 + teacher_row]
        );
        for (got, want) in weights[row * 3..row * 3 + 3].iter().zip([0.7, 0.2, 0.1]) {
            assert!((f64::from(*got) - want).abs() < 1e-6, "{got} vs {want}");
        }
    }
    assert_eq!(stats.completion_tokens, 5);
    assert_eq!(stats.distilled_positions, 5);
    let entropy = -(0.7 * 0.7f64.ln() + 0.2 * 0.2f64.ln() + 0.1 * 0.1f64.ln());
    assert!((stats.entropy_sum - 5.0 * entropy).abs() < 1e-5);
}

#[test]
fn hand_computed_renormalization_and_vocab_filter() {
    // Row 1: ids [5, 9, 7], probabilities 0.5, 0.3, 0.1; vocab 8 drops id 9, so the survivors
    // 0.5 and 0.1 renormalize to 5/6 and 1/6.
    let ids = Array2::from_shape_vec((2, 3), vec![0, 0, 0, 5, 9, 7]).unwrap();
    let lps = Array2::from_shape_vec(
        (2, 3),
        vec![
            -99999.0f32,
            -99999.0,
            -99999.0,
            0.5f32.ln(),
            0.3f32.ln(),
            0.1f32.ln(),
        ],
    )
    .unwrap();
    let mask = arr1(&[0.0f32, 1.0, 1.0]);
    let teacher = Teacher::DenseI32F32(DenseRows::new(0, ids.view(), lps.view()).unwrap());
    let input = dense_input(&mask, 2, 0, teacher);
    let (tokens, weights, stats) = dense(&input, &config(4, Some(8), 0)).unwrap();
    // Completion position 0 reads teacher row 0: the sentinel row, so it is missing.
    assert_eq!(&tokens[4..8], &[0, 0, 0, 0]);
    assert_eq!(&tokens[8..12], &[5, 7, 0, 0]);
    assert!((weights[8] - 5.0 / 6.0).abs() < 1e-6);
    assert!((weights[9] - 1.0 / 6.0).abs() < 1e-6);
    assert_eq!(weights[10], 0.0);
    assert_eq!(stats.missing_teacher_rows, 1);
    assert_eq!(stats.vocab_filtered_ids, 1);
    assert_eq!(stats.distilled_positions, 1);
}

#[test]
fn topk_cut_happens_before_vocab_filter() {
    // The first two entries are [100, 1]; vocab 50 drops 100, leaving id 1 alone with p = 1.
    let ids = Array2::from_shape_vec((1, 3), vec![100i64, 1, 2]).unwrap();
    let lps = Array2::from_shape_vec((1, 3), vec![-0.1f64, -1.0, -2.0]).unwrap();
    let mask = arr1(&[1.0f32]);
    let teacher = Teacher::DenseI64F64(DenseRows::new(0, ids.view(), lps.view()).unwrap());
    let input = dense_input(&mask, 1, 0, teacher);
    let (tokens, weights, _) = dense(&input, &config(2, Some(50), 0)).unwrap();
    assert_eq!(tokens, vec![1, 0]);
    assert_eq!(weights, vec![1.0, 0.0]);
}

#[test]
fn sentinel_rules_match_topk_to_lists() {
    // Row 0: first cell sentinel -> empty even though a later cell is real.
    // Row 1: [a, S, b, S] -> entries a, S, b (a middle sentinel is an entry).
    let s = SENTINEL_LOGPROB as f32;
    let ids = Array2::from_shape_vec((2, 4), vec![0, 4, 0, 0, 3, 0, 5, 0]).unwrap();
    let lps = Array2::from_shape_vec((2, 4), vec![s, -1.0, s, s, -1.0, s, -2.0, s]).unwrap();
    let mask = arr1(&[1.0f32, 1.0]);
    let teacher = Teacher::DenseI32F32(DenseRows::new(0, ids.view(), lps.view()).unwrap());
    let input = dense_input(&mask, 2, 0, teacher);
    let (tokens, weights, stats) = dense(&input, &config(4, None, 0)).unwrap();
    assert_eq!(&tokens[0..4], &[0, 0, 0, 0]);
    assert_eq!(&tokens[4..8], &[3, 0, 5, 0]);
    assert_eq!(weights[5], 0.0); // exp(-99999 - lse) flushes to exactly 0
    assert!((f64::from(weights[4]) - 1.0 / (1.0 + (-1.0f64).exp())).abs() < 1e-6);
    assert_eq!(stats.missing_teacher_rows, 1);
}

#[test]
fn ragged_and_dense_agree_and_csr_densifies_to_dense() {
    let (ids, lps) = worked_example_teacher();
    let mask = arr1(&[0.0f32, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]);
    let cfg = config(2, Some(1008), 1);
    // Gather rows the way the binding does.
    let window = consulted_teacher_rows(mask.view(), 5, 6, cfg.skip_first_n);
    assert_eq!(window, 7..11);
    let mut spans = Vec::new();
    let (mut flat_ids, mut flat_lps) = (Vec::new(), Vec::new());
    for row in window.clone() {
        let start = flat_ids.len();
        for k in 0..3 {
            flat_ids.push(i64::from(ids[[row, k]]));
            flat_lps.push(f64::from(lps[[row, k]]));
        }
        spans.push(Some(start..flat_ids.len()));
    }
    let ragged = RaggedRows {
        num_rows: 11,
        first_row: window.start,
        spans: &spans,
        ids: &flat_ids,
        logprobs: &flat_lps,
    };
    let dense_rows = DenseRows::new(0, ids.view(), lps.view()).unwrap();
    let make = |teacher| DatumInput {
        mask: mask.view(),
        completion_len: 5,
        teacher_prompt_len: 6,
        teacher,
    };
    let (dense_tokens, dense_weights, dense_stats) =
        dense(&make(Teacher::DenseI32F32(dense_rows.clone())), &cfg).unwrap();
    let (ragged_tokens, ragged_weights, ragged_stats) =
        dense(&make(Teacher::Ragged(ragged)), &cfg).unwrap();
    let (csr, csr_stats) =
        build_csr_datum(0, &make(Teacher::DenseI32F32(dense_rows)), &cfg).unwrap();
    assert_eq!(
        (&dense_tokens, &dense_weights),
        (&ragged_tokens, &ragged_weights)
    );
    assert_eq!(dense_stats, ragged_stats);
    assert_eq!(dense_stats, csr_stats);
    assert_eq!(densify(&csr), (dense_tokens.clone(), dense_weights));
    // Row 4 (teacher row 7): decoy 1007 < 1008 kept; rows 5.. keep only the true token.
    assert_eq!(&dense_tokens[8..10], &[22, 1007]);
    assert_eq!(&dense_tokens[10..12], &[23, 0]);
    assert_eq!(dense_stats.skipped_positions, 1);
    assert_eq!(dense_stats.vocab_filtered_ids, 3);
    assert_eq!(csr.crow, vec![0, 0, 0, 0, 0, 2, 3, 4, 5]);
    assert_eq!(csr.col, vec![0, 1, 0, 0, 0]);
}

#[test]
fn non_contiguous_views_give_the_same_result() {
    let (ids, lps) = worked_example_teacher();
    let ids_t = ids.t().to_owned(); // (3, 11); its transpose is a strided (11, 3) view
    let lps_t = lps.t().to_owned();
    let mask = arr1(&[0.0f32, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]);
    let cfg = config(3, None, 0);
    let make = |teacher| DatumInput {
        mask: mask.view(),
        completion_len: 5,
        teacher_prompt_len: 6,
        teacher,
    };
    let contiguous = dense(
        &make(Teacher::DenseI32F32(
            DenseRows::new(0, ids.view(), lps.view()).unwrap(),
        )),
        &cfg,
    )
    .unwrap();
    let strided = dense(
        &make(Teacher::DenseI32F32(
            DenseRows::new(0, ids_t.t(), lps_t.t()).unwrap(),
        )),
        &cfg,
    )
    .unwrap();
    assert_eq!(contiguous, strided);
}

#[test]
fn extreme_logprobs_stay_finite() {
    let ids = Array2::from_shape_vec((1, 4), vec![1i64, 2, 3, 4]).unwrap();
    let lps = Array2::from_shape_vec((1, 4), vec![1e308, -1e308, -1e4, 0.0]).unwrap();
    let mask = arr1(&[1.0f32]);
    let teacher = Teacher::DenseI64F64(DenseRows::new(0, ids.view(), lps.view()).unwrap());
    let input = dense_input(&mask, 1, 0, teacher);
    let (_, weights, stats) = dense(&input, &config(4, None, 0)).unwrap();
    assert_eq!(weights, vec![1.0, 0.0, 0.0, 0.0]);
    assert_eq!(stats.entropy_sum, 0.0);
}

#[test]
fn bad_values_name_datum_and_position() {
    let mask = arr1(&[0.0f32, 1.0, 1.0]);
    let cfg = config(2, None, 0);
    let at = "datum 4: completion position 1 (student position 2, teacher row 3), entry 1";
    let cases: Vec<(i64, f64, String)> = vec![
        (
            -1,
            -0.5,
            format!("{at}: token id -1 is outside [0, 2147483647]"),
        ),
        (
            2_147_483_648,
            -0.5,
            format!("{at}: token id 2147483648 is outside [0, 2147483647]"),
        ),
        (
            7,
            f64::NAN,
            format!("{at}: logprob is NaN; teacher logprobs must be finite"),
        ),
        (
            7,
            f64::INFINITY,
            format!("{at}: logprob is inf; teacher logprobs must be finite"),
        ),
    ];
    for (bad_id, bad_lp, message) in cases {
        let ids = Array2::from_shape_vec((4, 2), vec![0, 0, 0, 0, 1, 2, 3, bad_id]).unwrap();
        let lps =
            Array2::from_shape_vec((4, 2), vec![0.0, 0.0, 0.0, 0.0, -0.1, -0.2, -0.3, bad_lp])
                .unwrap();
        let teacher = Teacher::DenseI64F64(DenseRows::new(0, ids.view(), lps.view()).unwrap());
        let input = dense_input(&mask, 2, 2, teacher);
        let (mut tokens, mut weights) = (vec![0; 6], vec![0.0; 6]);
        let err = build_dense_datum(4, &input, &cfg, &mut tokens, &mut weights).unwrap_err();
        assert_eq!(err.to_string(), message);
    }
}

#[test]
fn bad_mask_and_shapes_are_errors() {
    let mask = arr1(&[0.0f32, f32::NAN]);
    let input = DatumInput {
        mask: mask.view(),
        completion_len: 1,
        teacher_prompt_len: 0,
        teacher: Teacher::Missing,
    };
    let (mut tokens, mut weights) = (vec![0; 4], vec![0.0; 4]);
    let err =
        build_dense_datum(1, &input, &config(2, None, 0), &mut tokens, &mut weights).unwrap_err();
    assert_eq!(
        err.to_string(),
        "datum 1: mask[1] is NaN; mask values must be finite"
    );

    let ids = Array2::<i32>::zeros((3, 2));
    let lps = Array2::<f32>::zeros((3, 3));
    let err = DenseRows::new(5, ids.view(), lps.view()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "datum 5: teacher token_ids shape [3, 2] and logprobs shape [3, 3] differ"
    );

    let mask = arr1(&[1.0f32]);
    let input = DatumInput {
        mask: mask.view(),
        completion_len: 1,
        teacher_prompt_len: 0,
        teacher: Teacher::Missing,
    };
    let err =
        build_dense_datum(0, &input, &config(2, None, 0), &mut [0; 3], &mut [0.0; 2]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "datum 0: output buffers hold 3 and 2 cells, expected 2 (internal error)"
    );
}

#[test]
fn config_rejects_bad_arguments() {
    let msg = |r: Result<Config, KernelError>| r.unwrap_err().to_string();
    assert_eq!(
        msg(Config::new(0, None, 3, 1.0)),
        "topk must be between 1 and 4096, got 0"
    );
    assert_eq!(
        msg(Config::new(4097, None, 3, 1.0)),
        "topk must be between 1 and 4096, got 4097"
    );
    assert_eq!(
        msg(Config::new(20, Some(0), 3, 1.0)),
        "vocab_size must be >= 1 (or None), got 0"
    );
    assert_eq!(
        msg(Config::new(20, None, -1, 1.0)),
        "skip_first_n must be >= 0, got -1"
    );
    assert_eq!(
        msg(Config::new(20, None, 3, f64::NAN)),
        "weight_scale must be a finite number >= 0, got NaN"
    );
    assert_eq!(
        msg(Config::new(20, None, 3, -1.0)),
        "weight_scale must be a finite number >= 0, got -1"
    );
    assert_eq!(
        Config::new(20, None, i64::MAX, 2.0).unwrap().skip_first_n,
        i64::MAX as usize
    );
}

/// Defect #28: a scale that is finite in f64 but above the largest f32 made `inf` weights.
#[test]
fn weight_scale_must_fit_float32() {
    let msg = |scale: f64| Config::new(2, None, 0, scale).unwrap_err().to_string();
    assert_eq!(
        msg(1e39),
        "weight_scale must be at most 3.4028234663852886e38 (the largest float32: weights are \
         float32), got 1e39"
    );
    let just_above = f64::from_bits(MAX_WEIGHT_SCALE.to_bits() + 1);
    assert_eq!(
        msg(just_above),
        "weight_scale must be at most 3.4028234663852886e38 (the largest float32: weights are \
         float32), got 3.402823466385289e38"
    );
    assert_eq!(
        msg(f64::MAX),
        "weight_scale must be at most 3.4028234663852886e38 (the largest float32: weights are \
         float32), got 1.7976931348623157e308"
    );
    // The largest accepted scale: a probability-1 entry gets exactly f32::MAX, and no weight of
    // any row (whatever its log-probs) overflows.
    let cfg = Config::new(4, None, 0, MAX_WEIGHT_SCALE).unwrap();
    let ids = Array2::from_shape_fn((64, 4), |(r, k)| (r * 4 + k) as i64);
    let lps = Array2::from_shape_fn((64, 4), |(r, k)| match (r, k) {
        (0, 0) => 0.0,
        (0, _) => -1e6, // row 0: one entry holds all the mass
        _ => -(((r * 37 + k * 11) % 23) as f64) * 0.173 * (r % 5) as f64,
    });
    let mask = ndarray::Array1::from_elem(64, 1.0f32);
    let teacher = Teacher::DenseI64F64(DenseRows::new(0, ids.view(), lps.view()).unwrap());
    let (_, weights, stats) = dense(&dense_input(&mask, 64, 0, teacher), &cfg).unwrap();
    assert_eq!(stats.distilled_positions, 64);
    assert_eq!(&weights[..4], &[f32::MAX, 0.0, 0.0, 0.0]);
    assert!(weights.iter().all(|w| w.is_finite() && *w >= 0.0));
    // Rows of equal entries: p = 1/4 exactly, so the weight is exactly f32::MAX / 4.
    assert_eq!(&weights[4 * 5..4 * 6], &[f32::MAX / 4.0; 4]);
}

#[test]
fn dense_block_offsets_and_thread_count() {
    assert_eq!(dense_block_offsets(&[], 3).unwrap(), vec![0]);
    assert_eq!(
        dense_block_offsets(&[2, 0, 5], 3).unwrap(),
        vec![0, 6, 6, 21]
    );
    assert_eq!(
        dense_block_offsets(&[1, usize::MAX / 2], 4)
            .unwrap_err()
            .to_string(),
        "datum 1: the (N, topk) output is too large"
    );
    assert_eq!(
        dense_block_offsets(&[usize::MAX / 6, usize::MAX / 6], 4)
            .unwrap_err()
            .to_string(),
        "datum 1: the (N, topk) output is too large"
    );
    assert_eq!(thread_count(3, 10), 3);
    assert_eq!(thread_count(0, 4_095), 1);
    let auto = thread_count(0, 4_096);
    assert!((1..=8).contains(&auto), "{auto}");
}

#[test]
fn gathered_rows_read_like_the_rows_they_hold() {
    let mut gathered = GatheredRows::default();
    gathered.start(99, 1);
    gathered.push_entry(9, -7.0); // left over from an earlier teacher: forgotten by `start`
    gathered.start(6, 2);
    gathered.push_entry(4, -0.5);
    gathered.push_entry(5, -1.5);
    gathered.finish_row(); // teacher row 2
    gathered.push_none_row(); // teacher row 3
    gathered.finish_row(); // teacher row 4: empty
    gathered.push_entry(7, 0.0);
    gathered.finish_row(); // teacher row 5
    let rows = gathered.rows();
    assert_eq!((rows.num_rows, rows.first_row), (6, 2));
    assert_eq!(rows.spans, &[Some(0..2), None, Some(2..2), Some(2..3)]);
    assert_eq!(
        (rows.ids, rows.logprobs),
        (&[4, 5, 7][..], &[-0.5, -1.5, 0.0][..])
    );
    // Completion positions 0..4 read teacher rows 2..6 (q = 2); row 6 is past the end.
    let mask = arr1(&[1.0f32, 1.0, 1.0, 1.0, 1.0]);
    let input = dense_input(&mask, 5, 2, Teacher::Ragged(rows));
    let (tokens, weights, stats) = dense(&input, &config(2, None, 0)).unwrap();
    assert_eq!(tokens, vec![4, 5, 0, 0, 0, 0, 7, 0, 0, 0]);
    assert_eq!(weights[6], 1.0);
    assert!((f64::from(weights[0]) - 1.0 / (1.0 + (-1.0f64).exp())).abs() < 1e-7);
    assert_eq!(stats.missing_teacher_rows, 3);
    // A row before the gathered window is an internal error, not a silent zero.
    let mask = arr1(&[1.0f32]);
    let input = dense_input(&mask, 1, 1, Teacher::Ragged(gathered.rows()));
    assert_eq!(
        dense(&input, &config(2, None, 0)).unwrap_err(),
        KernelError::Internal("datum 0: teacher row 1 was not gathered".into())
    );
}

#[test]
fn completion_positions_and_consulted_rows() {
    let mask = arr1(&[0.0f32, 1.0, -1.0, 0.5, 0.0, 2.0]);
    assert_eq!(
        completion_positions(mask.view()).collect::<Vec<_>>(),
        vec![1, 3, 5]
    );
    assert_eq!(consulted_teacher_rows(mask.view(), 10, 4, 1), 5..7);
    assert_eq!(consulted_teacher_rows(mask.view(), 2, 4, 5), 6..6);
    assert_eq!(
        position_context(2, 5, 6),
        "completion position 2 (student position 5, teacher row 6)"
    );
}

#[test]
fn short_teacher_missing_teacher_truncation_and_skip_are_counted() {
    let ids = Array2::from_shape_vec((3, 1), vec![0, 1, 2]).unwrap();
    let lps = Array2::from_shape_vec((3, 1), vec![-99999.0f32, 0.0, 0.0]).unwrap();
    let mask = arr1(&[0.0f32, 1.0, 1.0, 1.0, 1.0, 1.0]);
    // 5 mask positions, a slice of 4 tokens (truncated), teacher rows 0..3 only (q = 1).
    let teacher = Teacher::DenseI32F32(DenseRows::new(0, ids.view(), lps.view()).unwrap());
    let input = dense_input(&mask, 4, 1, teacher);
    let (tokens, weights, stats) = dense(&input, &config(1, None, 1)).unwrap();
    assert_eq!(tokens, vec![0, 0, 2, 0, 0, 0]);
    assert_eq!(weights, vec![0.0, 0.0, 1.0, 0.0, 0.0, 0.0]);
    assert_eq!(
        stats,
        Stats {
            completion_tokens: 4,
            distilled_positions: 1,
            skipped_positions: 1,
            missing_teacher_rows: 2,
            vocab_emptied_positions: 0,
            vocab_filtered_ids: 0,
            truncated_positions: 1,
            entropy_sum: 0.0,
        }
    );
    let missing = DatumInput {
        teacher: Teacher::Missing,
        ..input
    };
    let (csr, stats) = build_csr_datum(0, &missing, &config(1, None, 0)).unwrap();
    assert_eq!(densify(&csr).0, vec![0; 6]);
    assert_eq!(csr.crow, vec![0; 7]);
    assert_eq!(stats.missing_teacher_rows, 4);
}

#[test]
fn weight_scale_multiplies_weights_not_entropy() {
    let ids = Array2::from_shape_vec((1, 2), vec![1, 2]).unwrap();
    let lps = Array2::from_shape_vec((1, 2), vec![0.5f32.ln(), 0.5f32.ln()]).unwrap();
    let mask = arr1(&[1.0f32]);
    let teacher = Teacher::DenseI32F32(DenseRows::new(0, ids.view(), lps.view()).unwrap());
    let input = dense_input(&mask, 1, 0, teacher);
    let cfg = Config::new(2, None, 0, 0.25).unwrap();
    let (_, weights, stats) = dense(&input, &cfg).unwrap();
    assert_eq!(weights, vec![0.125, 0.125]);
    assert!((stats.entropy_sum - std::f64::consts::LN_2).abs() < 1e-12);
}

/// A batch of ragged datums, built on 1 and on 3 threads, dense and CSR: identical results,
/// and the lowest failing datum's error whatever the thread count.
#[test]
fn batches_are_deterministic_across_thread_counts() {
    let teachers: Vec<(Array2<i32>, Array2<f32>)> = (0..7)
        .map(|d| {
            let rows = 5 + d * 3;
            let ids = Array2::from_shape_fn((rows, 4), |(r, k)| ((r * 7 + k * 13 + d) % 50) as i32);
            let lps = Array2::from_shape_fn((rows, 4), |(r, k)| {
                -(((r + k + d) % 9) as f32) * 0.4 - k as f32
            });
            (ids, lps)
        })
        .collect();
    let masks: Vec<ndarray::Array1<f32>> = (0..7)
        .map(|d| ndarray::Array1::from_shape_fn(4 + d * 2, |j| if j >= 2 { 1.0 } else { 0.0 }))
        .collect();
    let inputs: Vec<DatumInput> = teachers
        .iter()
        .zip(&masks)
        .enumerate()
        .map(|(d, ((ids, lps), mask))| DatumInput {
            mask: mask.view(),
            completion_len: 2 + d,
            teacher_prompt_len: 3,
            teacher: Teacher::DenseI32F32(DenseRows::new(0, ids.view(), lps.view()).unwrap()),
        })
        .collect();
    let cfg = config(3, Some(40), 1);
    let cells: usize = masks.iter().map(|m| m.len() * 3).sum();
    let run_dense = |threads| {
        let (mut tokens, mut weights) = (vec![0i64; cells], vec![0f32; cells]);
        let stats =
            build_dense_batch(&inputs, 0, &cfg, &mut tokens, &mut weights, threads).unwrap();
        (tokens, weights, stats)
    };
    let single = run_dense(1);
    assert_eq!(single, run_dense(3));
    assert!(single.2.distilled_positions > 0 && single.2.vocab_filtered_ids > 0);
    let (csr_single, csr_stats) = build_csr_batch(&inputs, 0, &cfg, 1).unwrap();
    assert_eq!(
        (csr_single.clone(), csr_stats),
        build_csr_batch(&inputs, 0, &cfg, 3).unwrap()
    );
    let mut offset = 0;
    for (csr, mask) in csr_single.iter().zip(&masks) {
        let n = mask.len() * 3;
        assert_eq!(
            densify(csr),
            (
                single.0[offset..offset + n].to_vec(),
                single.1[offset..offset + n].to_vec()
            )
        );
        offset += n;
    }

    let bad = arr1(&[f32::NAN; 4]);
    let mut broken = inputs.clone();
    broken[2].mask = bad.view();
    broken[5].mask = bad.view();
    for threads in [1, 2, 3, 7] {
        let cells_broken: usize = broken.iter().map(|i| i.mask.len() * 3).sum();
        let (mut tokens, mut weights) = (vec![0i64; cells_broken], vec![0f32; cells_broken]);
        let err =
            build_dense_batch(&broken, 0, &cfg, &mut tokens, &mut weights, threads).unwrap_err();
        assert_eq!(
            err.to_string(),
            "datum 2: mask[0] is NaN; mask values must be finite"
        );
        let err = build_csr_batch(&broken, 0, &cfg, threads).unwrap_err();
        assert_eq!(
            err.to_string(),
            "datum 2: mask[0] is NaN; mask values must be finite"
        );
    }
    // A sub-batch names its datums by their index in the whole batch.
    let err = build_csr_batch(&broken[3..], 3, &cfg, 2).unwrap_err();
    assert_eq!(
        err.to_string(),
        "datum 5: mask[0] is NaN; mask values must be finite"
    );
}

/// The AVX2 and portable compilations of the row loop give bit-identical outputs and stats.
#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_and_portable_row_loops_agree_bitwise() {
    use super::datum::fill_rows_avx2;
    if !std::is_x86_feature_detected!("avx2") {
        return;
    }
    let rows = 300;
    let ids = Array2::from_shape_fn((rows, 23), |(r, k)| ((r * 31 + k * 17) % 997) as i32);
    let lps = Array2::from_shape_fn((rows, 23), |(r, k)| {
        -(((r * 7 + k * 3) % 11) as f32) * 0.91
            - (k as f32) * 1.3
            - if k % 5 == 0 { 300.0 } else { 0.0 }
    });
    let mask = ndarray::Array1::from_shape_fn(rows - 1, |j| if j >= 40 { 1.0f32 } else { 0.0 });
    let teacher = Teacher::DenseI32F32(DenseRows::new(0, ids.view(), lps.view()).unwrap());
    let input = dense_input(&mask, 250, 45, teacher);
    let cfg = Config::new(20, Some(900), 2, 0.75).unwrap();
    let cells = mask.len() * cfg.topk;
    let run = |avx2: bool| {
        let (mut tokens, mut weights) = (vec![0i64; cells], vec![0f32; cells]);
        let mut sink = DenseSink {
            topk: cfg.topk,
            target_tokens: &mut tokens,
            weights: &mut weights,
        };
        let mut buffer = RowBuffer::new(cfg.topk);
        let stats = if avx2 {
            // SAFETY: AVX2 support was checked at the top of the test.
            unsafe { fill_rows_avx2(0, &input, &cfg, &mut buffer, &mut sink) }
        } else {
            fill_rows_body(0, &input, &cfg, &mut buffer, &mut sink)
        }
        .unwrap();
        (
            tokens,
            weights.iter().map(|w| w.to_bits()).collect::<Vec<_>>(),
            stats.entropy_sum.to_bits(),
            stats,
        )
    };
    let (portable, vectorized) = (run(false), run(true));
    assert!(portable.3.distilled_positions > 100 && portable.3.vocab_filtered_ids > 0);
    assert_eq!(portable, vectorized);
}
