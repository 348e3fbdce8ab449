//! The one thin PyO3 binding (`sdft._kernel`): Python objects in, kernel views out, pure work with
//! the GIL released (`py.detach`), owned output `Vec`s handed to NumPy without a copy.
//!
//! Exception policy (the same in every function): a Python object of the wrong type or dtype is a
//! `TypeError`; a well-typed value that is out of range, of the wrong shape or inconsistent is a
//! `ValueError`. Every message names the datum and, for per-value problems, the position.

use crate::buffer::ZeroedBuffer;
use crate::kernel::{
    build_csr_batch, build_dense_batch, consulted_teacher_rows, Config, CsrTargets, DatumInput,
    DenseRows, KernelError, RaggedRows, Stats, Teacher, KERNEL_VERSION, MAX_TOKEN_ID, MAX_TOPK,
    SENTINEL_LOGPROB,
};
use numpy::ndarray::ArrayView2;
use numpy::{
    Element, PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2,
    PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyOverflowError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyList, PyTuple};
use std::ops::Range;

fn type_error(datum: usize, message: impl std::fmt::Display) -> PyErr {
    PyTypeError::new_err(format!("datum {datum}: {message}"))
}

fn value_error(datum: usize, message: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(format!("datum {datum}: {message}"))
}

fn kernel_error(error: KernelError) -> PyErr {
    PyValueError::new_err(error.to_string())
}

/// A teacher's list view converted to numbers: only the rows the kernel will read. One is reused
/// for every list-view datum of a batch, so at most one datum's rows are held at a time.
#[derive(Default)]
struct GatheredRows {
    num_rows: usize,
    first_row: usize,
    spans: Vec<Option<Range<usize>>>,
    ids: Vec<i64>,
    logprobs: Vec<f64>,
}

enum TeacherGuard<'py> {
    Missing,
    I32F32(PyReadonlyArray2<'py, i32>, PyReadonlyArray2<'py, f32>),
    I32F64(PyReadonlyArray2<'py, i32>, PyReadonlyArray2<'py, f64>),
    I64F32(PyReadonlyArray2<'py, i64>, PyReadonlyArray2<'py, f32>),
    I64F64(PyReadonlyArray2<'py, i64>, PyReadonlyArray2<'py, f64>),
    /// The list view, converted right before its datum is built.
    List(Bound<'py, PyList>),
}

/// Keeps the NumPy borrows alive while the kernel reads the views without the GIL.
struct DatumGuard<'py> {
    mask: PyReadonlyArray1<'py, f32>,
    completion_len: usize,
    teacher_prompt_len: usize,
    teacher: TeacherGuard<'py>,
}

impl DatumGuard<'_> {
    fn is_list(&self) -> bool {
        matches!(self.teacher, TeacherGuard::List(_))
    }

    /// The kernel's view of the datum; a list-view teacher is read from `gathered`.
    fn view<'a>(&'a self, datum: usize, gathered: &'a GatheredRows) -> PyResult<DatumInput<'a>> {
        let dense_error = |message: String| value_error(datum, message);
        let teacher = match &self.teacher {
            TeacherGuard::Missing => Teacher::Missing,
            TeacherGuard::I32F32(ids, lps) => Teacher::DenseI32F32(
                DenseRows::new(ids.as_array(), lps.as_array()).map_err(dense_error)?,
            ),
            TeacherGuard::I32F64(ids, lps) => Teacher::DenseI32F64(
                DenseRows::new(ids.as_array(), lps.as_array()).map_err(dense_error)?,
            ),
            TeacherGuard::I64F32(ids, lps) => Teacher::DenseI64F32(
                DenseRows::new(ids.as_array(), lps.as_array()).map_err(dense_error)?,
            ),
            TeacherGuard::I64F64(ids, lps) => Teacher::DenseI64F64(
                DenseRows::new(ids.as_array(), lps.as_array()).map_err(dense_error)?,
            ),
            TeacherGuard::List(_) => Teacher::Ragged(RaggedRows {
                num_rows: gathered.num_rows,
                first_row: gathered.first_row,
                spans: &gathered.spans,
                ids: &gathered.ids,
                logprobs: &gathered.logprobs,
            }),
        };
        Ok(DatumInput {
            mask: self.mask.as_array(),
            completion_len: self.completion_len,
            teacher_prompt_len: self.teacher_prompt_len,
            teacher,
        })
    }
}

fn extract_count(datum: usize, name: &str, value: &Bound<'_, PyAny>) -> PyResult<usize> {
    if value.is_instance_of::<PyBool>() {
        return Err(type_error(
            datum,
            format!("{name} must be an int, got bool"),
        ));
    }
    let number: i64 = value.extract().map_err(|_| {
        type_error(
            datum,
            format!("{name} must be an int, got {}", type_name(value)),
        )
    })?;
    usize::try_from(number)
        .map_err(|_| value_error(datum, format!("{name} must be >= 0, got {number}")))
}

fn type_name(value: &Bound<'_, PyAny>) -> String {
    value
        .get_type()
        .name()
        .map(|name| name.to_string())
        .unwrap_or_else(|_| "<unknown>".to_string())
}

fn extract_mask<'py>(
    datum: usize,
    value: &Bound<'py, PyAny>,
) -> PyResult<PyReadonlyArray1<'py, f32>> {
    let array = value.cast::<PyArray1<f32>>().map_err(|_| {
        type_error(
            datum,
            format!(
                "mask must be a 1-D float32 numpy array, got {}",
                describe_array(value)
            ),
        )
    })?;
    array
        .try_readonly()
        .map_err(|e| value_error(datum, format!("mask cannot be read: {e}")))
}

fn describe_array(value: &Bound<'_, PyAny>) -> String {
    match value.cast::<PyUntypedArray>() {
        Ok(array) => format!("a {}-D {} array", array.ndim(), array.dtype()),
        Err(_) => type_name(value),
    }
}

/// Borrows a 2-D array of one of two element types.
enum Either2<'py, A: Element, B: Element> {
    A(PyReadonlyArray2<'py, A>),
    B(PyReadonlyArray2<'py, B>),
}

fn extract_dense<'py, A: Element, B: Element>(
    datum: usize,
    name: &str,
    allowed: &str,
    value: &Bound<'py, PyAny>,
) -> PyResult<Either2<'py, A, B>> {
    let untyped = value.cast::<PyUntypedArray>().map_err(|_| {
        type_error(
            datum,
            format!(
                "teacher {name} must be a numpy array, got {}",
                type_name(value)
            ),
        )
    })?;
    if untyped.ndim() != 2 {
        return Err(value_error(
            datum,
            format!(
                "teacher {name} must be 2-D (rows, K), got shape {:?}",
                untyped.shape()
            ),
        ));
    }
    let readonly_error =
        |e: numpy::BorrowError| value_error(datum, format!("teacher {name} cannot be read: {e}"));
    if let Ok(array) = value.cast::<PyArray2<A>>() {
        return Ok(Either2::A(array.try_readonly().map_err(readonly_error)?));
    }
    if let Ok(array) = value.cast::<PyArray2<B>>() {
        return Ok(Either2::B(array.try_readonly().map_err(readonly_error)?));
    }
    Err(type_error(
        datum,
        format!(
            "teacher {name} dtype must be {allowed}, got {}",
            untyped.dtype()
        ),
    ))
}

fn extract_dense_teacher<'py>(
    datum: usize,
    pair: &Bound<'py, PyTuple>,
) -> PyResult<TeacherGuard<'py>> {
    if pair.len() != 2 {
        return Err(type_error(
            datum,
            format!(
                "dense teacher must be a (token_ids, logprobs) pair, got a tuple of {}",
                pair.len()
            ),
        ));
    }
    let ids = extract_dense::<i32, i64>(datum, "token_ids", "int32 or int64", &pair.get_item(0)?)?;
    let lps =
        extract_dense::<f32, f64>(datum, "logprobs", "float32 or float64", &pair.get_item(1)?)?;
    Ok(match (ids, lps) {
        (Either2::A(ids), Either2::A(lps)) => TeacherGuard::I32F32(ids, lps),
        (Either2::A(ids), Either2::B(lps)) => TeacherGuard::I32F64(ids, lps),
        (Either2::B(ids), Either2::A(lps)) => TeacherGuard::I64F32(ids, lps),
        (Either2::B(ids), Either2::B(lps)) => TeacherGuard::I64F64(ids, lps),
    })
}

/// Where completion position `t` of a datum sits, for messages about list-view entries.
fn list_position(mask: &PyReadonlyArray1<'_, f32>, t: usize, row: usize) -> String {
    let student = mask
        .as_array()
        .iter()
        .enumerate()
        .filter(|(_, &m)| m > 0.0)
        .nth(t)
        .map(|(j, _)| j.to_string())
        .unwrap_or_else(|| "?".to_string());
    format!("completion position {t} (student position {student}, teacher row {row})")
}

/// Converts the rows the kernel will read from the list view (`None` or a list of
/// `(token_id, logprob)` pairs per row) into flat numbers. Only the first `topk` entries of each
/// row are touched.
fn gather_list_rows(
    datum: usize,
    rows: &Bound<'_, PyList>,
    mask: &PyReadonlyArray1<'_, f32>,
    completion_len: usize,
    teacher_prompt_len: usize,
    config: &Config,
    gathered: &mut GatheredRows,
) -> PyResult<()> {
    let num_rows = rows.len();
    let window = consulted_teacher_rows(
        mask.as_array(),
        completion_len,
        teacher_prompt_len,
        config.skip_first_n,
    );
    let window = window.start.min(num_rows)..window.end.min(num_rows);
    gathered.num_rows = num_rows;
    gathered.first_row = window.start;
    gathered.spans.clear();
    gathered.ids.clear();
    gathered.logprobs.clear();
    for row in window {
        let where_ = |entry: Option<usize>| {
            let at = list_position(mask, row.saturating_sub(teacher_prompt_len), row);
            match entry {
                Some(entry) => format!("{at}, entry {entry}"),
                None => at,
            }
        };
        let item = rows.get_item(row)?;
        if item.is_none() {
            gathered.spans.push(None);
            continue;
        }
        let start = gathered.ids.len();
        if let Ok(entries) = item.cast::<PyList>() {
            let take = entries.len().min(config.topk);
            for entry in 0..take {
                let (id, logprob) =
                    extract_entry(&entries.get_item(entry)?).map_err(|(is_type, problem)| {
                        entry_error(datum, is_type, where_(Some(entry)), problem)
                    })?;
                gathered.ids.push(id);
                gathered.logprobs.push(logprob);
            }
        } else if let Ok(entries) = item.cast::<PyTuple>() {
            let take = entries.len().min(config.topk);
            for entry in 0..take {
                let (id, logprob) =
                    extract_entry(&entries.get_item(entry)?).map_err(|(is_type, problem)| {
                        entry_error(datum, is_type, where_(Some(entry)), problem)
                    })?;
                gathered.ids.push(id);
                gathered.logprobs.push(logprob);
            }
        } else {
            return Err(type_error(
                datum,
                format!(
                    "{}: teacher row must be None or a list of (token_id, logprob) pairs, got {}",
                    where_(None),
                    type_name(&item)
                ),
            ));
        }
        gathered.spans.push(Some(start..gathered.ids.len()));
    }
    Ok(())
}

fn entry_error(datum: usize, is_type: bool, at: String, problem: String) -> PyErr {
    if is_type {
        type_error(datum, format!("{at}: {problem}"))
    } else {
        value_error(datum, format!("{at}: {problem}"))
    }
}

/// One `(token_id, logprob)` entry. Errors carry whether they are type errors.
fn extract_entry(entry: &Bound<'_, PyAny>) -> Result<(i64, f64), (bool, String)> {
    let not_a_pair = || {
        (
            true,
            format!(
                "entry must be a (token_id, logprob) pair, got {}",
                type_name(entry)
            ),
        )
    };
    let (id, logprob) = if let Ok(pair) = entry.cast::<PyTuple>() {
        if pair.len() != 2 {
            return Err((
                true,
                format!(
                    "entry must be a (token_id, logprob) pair, got a tuple of {}",
                    pair.len()
                ),
            ));
        }
        (
            pair.get_item(0).map_err(|_| not_a_pair())?,
            pair.get_item(1).map_err(|_| not_a_pair())?,
        )
    } else if let Ok(pair) = entry.cast::<PyList>() {
        if pair.len() != 2 {
            return Err((
                true,
                format!(
                    "entry must be a (token_id, logprob) pair, got a list of {}",
                    pair.len()
                ),
            ));
        }
        (
            pair.get_item(0).map_err(|_| not_a_pair())?,
            pair.get_item(1).map_err(|_| not_a_pair())?,
        )
    } else {
        return Err(not_a_pair());
    };
    if id.is_instance_of::<PyBool>() {
        return Err((true, "token id must be an int, got bool".to_string()));
    }
    let id = match id.extract::<i64>() {
        Ok(id) => id,
        Err(err) if err.is_instance_of::<PyOverflowError>(id.py()) => {
            return Err((
                false,
                format!("token id {id} is outside [0, {MAX_TOKEN_ID}]"),
            ));
        }
        Err(_) => {
            return Err((
                true,
                format!("token id must be an int, got {}", type_name(&id)),
            ))
        }
    };
    if logprob.is_instance_of::<PyBool>() {
        return Err((true, "logprob must be a float, got bool".to_string()));
    }
    let logprob = logprob.extract::<f64>().map_err(|_| {
        (
            true,
            format!("logprob must be a float, got {}", type_name(&logprob)),
        )
    })?;
    Ok((id, logprob))
}

fn stats_dict<'py>(py: Python<'py>, stats: &Stats) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    dict.set_item("completion_tokens", stats.completion_tokens)?;
    dict.set_item("distilled_positions", stats.distilled_positions)?;
    dict.set_item("skipped_positions", stats.skipped_positions)?;
    dict.set_item("missing_teacher_rows", stats.missing_teacher_rows)?;
    dict.set_item("vocab_emptied_positions", stats.vocab_emptied_positions)?;
    dict.set_item("vocab_filtered_ids", stats.vocab_filtered_ids)?;
    dict.set_item("truncated_positions", stats.truncated_positions)?;
    dict.set_item("entropy_sum", stats.entropy_sum)?;
    Ok(dict)
}

/// Owner of a batch's dense output memory: the base object of every NumPy array viewing it, so
/// the memory lives exactly as long as the last of those arrays.
#[pyclass(frozen, module = "sdft._kernel")]
struct OutputBuffer {
    storage: OutputStorage,
}

enum OutputStorage {
    TargetTokens(ZeroedBuffer<i64>),
    Weights(ZeroedBuffer<f32>),
}

#[pymethods]
impl OutputBuffer {
    /// Bytes of output memory this buffer owns (all datums' blocks of one tensor).
    #[getter]
    fn nbytes(&self) -> usize {
        match &self.storage {
            OutputStorage::TargetTokens(buffer) => buffer.len() * std::mem::size_of::<i64>(),
            OutputStorage::Weights(buffer) => buffer.len() * std::mem::size_of::<f32>(),
        }
    }
}

/// `(rows, topk)` NumPy views, one per datum, into a buffer holding the blocks back to back.
fn views_into<'py, T: numpy::Element + crate::buffer::Zeroable>(
    py: Python<'py>,
    mut buffer: ZeroedBuffer<T>,
    wrap: fn(ZeroedBuffer<T>) -> OutputStorage,
    rows: &[usize],
    topk: usize,
) -> PyResult<Vec<Bound<'py, PyArray2<T>>>> {
    let base = buffer.as_mut_ptr();
    let len = buffer.len();
    let owner = Bound::new(
        py,
        OutputBuffer {
            storage: wrap(buffer),
        },
    )?
    .into_any();
    let mut arrays = Vec::with_capacity(rows.len());
    let mut offset = 0usize;
    for &n in rows {
        let cells = n * topk;
        if offset + cells > len {
            return Err(PyValueError::new_err(
                "output buffer is smaller than its views (internal error)",
            ));
        }
        // SAFETY: `offset + cells <= len` elements starting at `base` belong to the buffer now owned
        // by `owner`, which never moves or frees them before it is dropped; `owner` becomes the base
        // object of the array, so it outlives the view. The memory was written by the kernel and
        // no Rust reference to it remains.
        let array = unsafe {
            let view = ArrayView2::from_shape_ptr((n, topk), base.add(offset));
            PyArray2::borrow_from_array(&view, owner.clone())
        };
        arrays.push(array);
        offset += cells;
    }
    Ok(arrays)
}

fn csr_to_python<'py>(py: Python<'py>, targets: CsrTargets) -> PyResult<Bound<'py, PyTuple>> {
    (
        PyArray1::from_vec(py, targets.crow),
        PyArray1::from_vec(py, targets.col),
        PyArray1::from_vec(py, targets.target_tokens),
        PyArray1::from_vec(py, targets.weights),
    )
        .into_pyobject(py)
}

/// Threads for a batch: `requested` when positive; otherwise one per core (at most 8) when the
/// batch is large enough to amortize starting them.
fn thread_count(requested: usize, total_rows: usize) -> usize {
    if requested > 0 {
        return requested;
    }
    if total_rows < 4_096 {
        return 1;
    }
    std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
}

/// Builds the `(N, K)` targets of a batch.
///
/// `datums` holds one `(mask, completion_len, teacher_prompt_len, teacher)` tuple per datum:
/// `mask` a 1-D float32 array of length `N`; `teacher` is `None`, the list view (a `list` of rows,
/// each `None` or a list of `(token_id, logprob)` pairs) or a `(token_ids, logprobs)` tuple of 2-D
/// arrays (int32/int64 and float32/float64, any strides). Returns `(outputs, stats)`: per datum
/// `(target_tokens, weights)` of shape `(N, topk)` (views into one zero-filled buffer per kind),
/// or with `sparse=True` the CSR parts `(crow_indices, col_indices, target_token_values,
/// weight_values)`. `threads=0` picks the thread count automatically.
#[pyfunction]
#[pyo3(signature = (datums, *, topk, vocab_size, skip_first_n, weight_scale, sparse, threads=0))]
#[allow(clippy::too_many_arguments)]
fn build_topk_batch<'py>(
    py: Python<'py>,
    datums: &Bound<'py, PyList>,
    topk: i64,
    vocab_size: Option<i64>,
    skip_first_n: i64,
    weight_scale: f64,
    sparse: bool,
    threads: usize,
) -> PyResult<(Bound<'py, PyList>, Bound<'py, PyDict>)> {
    let config = Config::new(topk, vocab_size, skip_first_n, weight_scale).map_err(kernel_error)?;

    let mut guards = Vec::with_capacity(datums.len());
    for (index, item) in datums.iter().enumerate() {
        let fields = item
            .cast::<PyTuple>()
            .map_err(|_| type_error(index, ITEM_SHAPE))?;
        if fields.len() != 4 {
            return Err(type_error(index, ITEM_SHAPE));
        }
        let mask = extract_mask(index, &fields.get_item(0)?)?;
        let completion_len = extract_count(index, "completion_len", &fields.get_item(1)?)?;
        let teacher_prompt_len = extract_count(index, "teacher_prompt_len", &fields.get_item(2)?)?;
        let teacher = fields.get_item(3)?;
        let teacher = if teacher.is_none() {
            TeacherGuard::Missing
        } else if let Ok(rows) = teacher.cast::<PyList>() {
            TeacherGuard::List(rows.clone())
        } else if let Ok(pair) = teacher.cast::<PyTuple>() {
            extract_dense_teacher(index, pair)?
        } else {
            return Err(type_error(
                index,
                format!(
                    "teacher must be None, a list of rows or a (token_ids, logprobs) tuple, got {}",
                    type_name(&teacher)
                ),
            ));
        };
        guards.push(DatumGuard {
            mask,
            completion_len,
            teacher_prompt_len,
            teacher,
        });
    }
    let rows: Vec<usize> = guards
        .iter()
        .map(|guard| guard.mask.as_array().len())
        .collect();
    let threads = thread_count(threads, rows.iter().sum());

    // Runs of datums with dense (or no) teachers are built in one call each, on several threads;
    // a list-view datum is converted and built on its own, so the converted rows of only one
    // datum exist at a time. Runs go in batch order: the first error is the lowest datum's.
    let mut segments: Vec<Range<usize>> = Vec::new();
    for (index, guard) in guards.iter().enumerate() {
        match segments.last_mut() {
            Some(last)
                if !guard.is_list() && !guards.get(last.start).is_some_and(DatumGuard::is_list) =>
            {
                last.end = index + 1
            }
            _ => segments.push(index..index + 1),
        }
    }
    let mut gathered = GatheredRows::default();
    let result = PyList::empty(py);
    let mut stats = Stats::default();
    if sparse {
        for segment in &segments {
            prepare_segment(&guards, segment, &config, &mut gathered)?;
            let inputs = segment_views(&guards, segment, &gathered)?;
            let (outputs, segment_stats) = py
                .detach(|| build_csr_batch(&inputs, segment.start, &config, threads))
                .map_err(kernel_error)?;
            stats.add(&segment_stats);
            for targets in outputs {
                result.append(csr_to_python(py, targets)?)?;
            }
        }
    } else {
        let mut offsets = Vec::with_capacity(rows.len() + 1);
        offsets.push(0usize);
        for (index, &n) in rows.iter().enumerate() {
            let cells = n
                .checked_mul(config.topk)
                .and_then(|cells| cells.checked_add(offsets[index]));
            offsets.push(
                cells.ok_or_else(|| value_error(index, "the (N, topk) output is too large"))?,
            );
        }
        let cells = offsets.last().copied().unwrap_or(0);
        let (mut target_tokens, mut weights) = py
            .detach(|| {
                Ok::<_, String>((
                    ZeroedBuffer::<i64>::new(cells, "the batch's (N, topk) int64 target_tokens")?,
                    ZeroedBuffer::<f32>::new(cells, "the batch's (N, topk) float32 weights")?,
                ))
            })
            .map_err(PyValueError::new_err)?;
        for segment in &segments {
            prepare_segment(&guards, segment, &config, &mut gathered)?;
            let inputs = segment_views(&guards, segment, &gathered)?;
            let block = offsets[segment.start]..offsets[segment.end];
            let (Some(tokens_block), Some(weights_block)) = (
                target_tokens.as_mut_slice().get_mut(block.clone()),
                weights.as_mut_slice().get_mut(block),
            ) else {
                return Err(PyValueError::new_err(
                    "output blocks out of range (internal error)",
                ));
            };
            let segment_stats = py
                .detach(|| {
                    build_dense_batch(
                        &inputs,
                        segment.start,
                        &config,
                        tokens_block,
                        weights_block,
                        threads,
                    )
                })
                .map_err(kernel_error)?;
            stats.add(&segment_stats);
        }
        let token_arrays = views_into(
            py,
            target_tokens,
            OutputStorage::TargetTokens,
            &rows,
            config.topk,
        )?;
        let weight_arrays = views_into(py, weights, OutputStorage::Weights, &rows, config.topk)?;
        for (tokens, weights) in token_arrays.into_iter().zip(weight_arrays) {
            result.append((tokens, weights))?;
        }
    }
    Ok((result, stats_dict(py, &stats)?))
}

/// Converts the list-view teacher of a one-datum list segment into `gathered`.
fn prepare_segment(
    guards: &[DatumGuard<'_>],
    segment: &Range<usize>,
    config: &Config,
    gathered: &mut GatheredRows,
) -> PyResult<()> {
    if let Some(guard) = guards.get(segment.start) {
        if let TeacherGuard::List(list) = &guard.teacher {
            gather_list_rows(
                segment.start,
                list,
                &guard.mask,
                guard.completion_len,
                guard.teacher_prompt_len,
                config,
                gathered,
            )?;
        }
    }
    Ok(())
}

fn segment_views<'a>(
    guards: &'a [DatumGuard<'_>],
    segment: &Range<usize>,
    gathered: &'a GatheredRows,
) -> PyResult<Vec<DatumInput<'a>>> {
    let Some(segment_guards) = guards.get(segment.clone()) else {
        return Err(PyValueError::new_err(
            "segment out of range (internal error)",
        ));
    };
    segment_guards
        .iter()
        .zip(segment.clone())
        .map(|(guard, index)| guard.view(index, gathered))
        .collect()
}

const ITEM_SHAPE: &str = "expected a (mask, completion_len, teacher_prompt_len, teacher) tuple";

#[pymodule]
fn _kernel(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", KERNEL_VERSION)?;
    m.add("MAX_TOPK", MAX_TOPK)?;
    m.add("MAX_TOKEN_ID", MAX_TOKEN_ID)?;
    m.add("SENTINEL_LOGPROB", SENTINEL_LOGPROB)?;
    m.add_class::<OutputBuffer>()?;
    m.add_function(wrap_pyfunction!(build_topk_batch, m)?)?;
    Ok(())
}
